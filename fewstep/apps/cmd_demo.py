"""``fewstep demo``: launch the Gradio demo (bundled digits model, no download)."""

from __future__ import annotations

import argparse

from .options import (
    add_model_options,
    add_parser,
    add_threads_option,
    apply_threads,
    check_model_path,
    check_positive,
    is_digits_model,
)

DESCRIPTION = """\
Launch the Gradio demo: generate with any scheduler and guidance method, and compare settings side
by side. Opens on the bundled digits teacher (offline). Needs gradio: pip install "fewstep[demo]".

examples:
  fewstep demo                                   # http://127.0.0.1:7860
  fewstep demo --host 0.0.0.0 --port 8080 --model ./my-sd-folder
"""


def _run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    check_model_path(args.model)
    check_positive("--concurrency", args.concurrency)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("fewstep demo needs gradio: pip install 'fewstep[demo]' (or pip install gradio)") from None
    apply_threads(args.threads, tiny=is_digits_model(args.model))
    from .demo import build_demo

    demo = build_demo(model=args.model, device=args.device, dtype=args.dtype, allow_download=args.allow_download,
                      preload=True, concurrency=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share == "yes", show_error=True)
    return 0


def register(subparsers) -> None:
    """Add ``fewstep demo`` to ``subparsers``."""
    p = add_parser(subparsers, "demo", help="launch the Gradio demo (digits model by default, offline)",
                   description=DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7860, help="port")
    p.add_argument("--share", choices=("no", "yes"), default="no",
                   help="create a public gradio.live link (needs internet)")
    p.add_argument("--concurrency", type=int, default=2, metavar="N",
                   help="requests that run at once (the digits model runs them in parallel; diffusers pipelines take "
                        "turns); the others wait in the queue and see their position")
    add_model_options(p, "model the demo opens with: 'digits', a student ('digits-cd', ...), a local diffusers "
                         "folder or a hub id")
    add_threads_option(p)
    p.set_defaults(func=_run)
