"""``fewstep demo``: launch the Gradio demo (bundled digits model, no download).

    fewstep demo                      # http://127.0.0.1:7860
    fewstep demo --host 0.0.0.0 --port 8080 --model ./my-sd-folder

Needs the ``demo`` extra (``pip install "fewstep[demo]"``, i.e. gradio).
"""

from __future__ import annotations

import argparse

from .common import DIGITS, DTYPES


def _run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("fewstep demo needs gradio: pip install 'fewstep[demo]' (or pip install gradio)") from None
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    from .demo import build_demo

    demo = build_demo(model=args.model, device=args.device, dtype=args.dtype, allow_download=args.allow_download,
                      preload=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share == "yes", show_error=True)
    return 0


def register(subparsers) -> None:
    """Add ``fewstep demo`` to ``subparsers``."""
    p = subparsers.add_parser(
        "demo",
        help="launch the Gradio demo (digits model by default, offline)",
        description="Launch the Gradio demo: generate and compare schedulers/guidance side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7860, help="port")
    p.add_argument("--share", choices=("no", "yes"), default="no",
                   help="create a public gradio.live link (needs internet; off by default)")
    p.add_argument("--model", default=DIGITS, help="model the demo opens with ('digits', a folder or a hub id)")
    p.add_argument("--allow-download", action="store_true", help="let users load hub ids from the Hugging Face Hub")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="model dtype")
    p.set_defaults(func=_run)
