"""The ``fewstep`` command line.

Each subcommand lives in its own module that exposes ``register(subparsers)``; the module adds
its parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning
an exit code). Registering imports no torch, diffusers or gradio: ``fewstep --help`` is fast and
every subcommand checks its arguments before it imports them (see :mod:`fewstep.apps.options`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand module paths; each must define register(subparsers)
SUBCOMMAND_MODULES = (
    "fewstep.apps.cmd_sample",
    "fewstep.apps.cmd_demo",
    "fewstep.apps.cmd_eval",
    "fewstep.apps.cmd_ems",
    "fewstep.apps.cmd_teacher",
    "fewstep.apps.cmd_guidance",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="fewstep", description="Few-step diffusion sampling toolkit: sample, evaluate, compute EMS, run the "
        "demo. 'fewstep COMMAND --help' describes each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fewstep`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fewstep {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
