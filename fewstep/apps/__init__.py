"""User-facing applications: the ``fewstep`` command line and the Gradio demo."""
