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
    "fewstep.apps.cmd_distill",
    "fewstep.apps.cmd_lcsc",
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
    except KeyboardInterrupt:
        print(f"\nfewstep {args.command}: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return INTERRUPTED


#: exit status after Ctrl-C (128 + SIGINT), as shells report it
INTERRUPTED = 130


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted command: the subcommand's ``resume_hint(args)`` (set with
    ``set_defaults``) or, for commands that keep no progress, a rerun."""
    hint = getattr(args, "resume_hint", None)
    if callable(hint):
        try:
            return hint(args)
        except Exception:  # noqa: BLE001 - the hint must never turn Ctrl-C into a traceback
            pass
    elif isinstance(hint, str):
        return hint
    return "nothing was written; rerun the same command to start again"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
