"""``fewstep distill METHOD --config RECIPE --output RUN [--resume]``: distil a teacher into a few-step student.

Methods: ``cd`` (consistency distillation), ``lcm`` (latent consistency model with a guidance
embedding), ``lcm-lora`` (LCM-LoRA adapters); ``fdistill`` and ``disback`` (one-step generators by
f-divergence distribution matching, docs/fdistill.md); see docs/distill.md. The recipe (JSON; examples in
``configs/distill/``) is validated before anything is loaded. Runs under ``accelerate launch`` for
several processes/GPUs unchanged. Prints the run summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .._io import check_output_dir


def _run(args: argparse.Namespace) -> int:
    check_output_dir(args.output, "--output", create=False)  # before torch loads, long before the first checkpoint
    from fewstep.distill.config import apply_overrides, load_config_file
    from fewstep.distill.trainer import Trainer

    config = load_config_file(args.config) if args.config else {}
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"train.device={json.dumps(args.device)}")
    if args.threads is not None:
        overrides.append(f"train.num_threads={args.threads}")
    config = apply_overrides(config, overrides)
    crash = os.environ.get("FEWSTEP_DISTILL_CRASH_AT")  # testing aid: die like a kill after that step
    trainer = Trainer(args.method, config, args.output, resume=args.resume, progress=not args.no_progress,
                      crash_at=int(crash) if crash else None)
    summary = trainer.train()
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    """Add the ``distill`` subcommand."""
    p = subparsers.add_parser(
        "distill",
        help="distil a teacher into a few-step student (CD, LCM, LCM-LoRA, f-distill, DisBack)",
        description="Train a consistency or one-step student from a teacher (the bundled digits teacher or a local "
        "diffusers SD/SDXL pipeline folder). Checkpoints, logs, plots and the exported student go to "
        "--output; an interrupted run continues with --resume. Multi-GPU: accelerate launch -m "
        "fewstep.apps.cli distill ...",
    )
    p.add_argument("method", help="distillation method: cd, lcm, lcm-lora, fdistill, disback (checked against the "
                   "registry)")
    p.add_argument("--config", default=None, help="recipe JSON (e.g. configs/distill/cd_digits.json)")
    p.add_argument("--output", required=True, help="run directory (config, log, checkpoints, final student)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--device", default=None, help="override train.device (auto, cpu, cuda, cuda:N, mps)")
    p.add_argument("--threads", type=int, default=None, help="override train.num_threads")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set train.lr=2e-4 --set method.skip=2 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run, resume_hint=_resume_hint)


def _resume_hint(args: argparse.Namespace) -> str:
    """What ``fewstep distill`` prints when interrupted (Ctrl-C)."""
    resume = [] if args.resume else ["--resume"]
    return (f"checkpoints are in {Path(args.output) / 'checkpoints'}; rerun the same command"
            f"{' with --resume' if resume else ''} to continue from the last one")
