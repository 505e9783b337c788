"""``fewstep train-teacher`` and ``fewstep train-classifier``: retrain the bundled digits models.

Both read ``configs/digits_teacher.json`` style configs (keys ``teacher`` / ``classifier``, or a
flat dict for the one model), run deterministically on CPU with the given seed, resume from
``--work-dir`` when interrupted, and write the weights into ``--output-dir`` (default:
``out/teacher`` / ``out/classifier``; the installed package's ``weights/`` folder only when passed
explicitly). Both folders are checked for writability before training starts.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from .._io import check_output_dir, read_json
from .options import add_parser

#: default --output-dir per model (fewstep.models.train's TEACHER_OUTPUT_DIR / CLASSIFIER_OUTPUT_DIR;
#: not imported from there, which would import torch before the arguments are checked)
OUTPUT_DIRS = {"teacher": "out/teacher", "classifier": "out/classifier"}


def _load_config(path: str | None, key: str) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--config file {path} does not exist")
    data = read_json(p, "--config")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a JSON object")
    return data[key] if key in data else data


def _train(args: argparse.Namespace, model: str, override: str) -> int:
    """``train-teacher`` / ``train-classifier``: the config (``--config``'s ``model`` key or the whole
    file), ``--steps``/``--epochs`` on top, then :mod:`fewstep.models.train`."""
    config = _load_config(args.config, model) or {}
    if getattr(args, override) is not None:
        config = {**config, override: getattr(args, override)}
    check_output_dir(args.output_dir, "--output-dir")  # before torch loads and long before the weights exist
    check_output_dir(args.work_dir, "--work-dir")
    extra = {}
    if model == "teacher":
        if args.snapshot_every is not None and args.snapshot_every < 0:
            raise ValueError(f"--snapshot-every must be >= 0 (0: no snapshots), got {args.snapshot_every}")
        extra["snapshot_every"] = args.snapshot_every
    from fewstep.models import train

    record = getattr(train, f"train_{model}")(config, seed=args.seed, work_dir=args.work_dir,
                                              output_dir=args.output_dir, **extra)
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2))
    return 0


# model -> (command, help, description, the option that sets the training length, its help)
_COMMANDS = {
    "teacher": ("train-teacher", "retrain the bundled v-prediction digits teacher (CPU, ~20 min)",
                "Train the class-conditional digits UNet (v-prediction, CFG label dropout) and write "
                "digits_unet.safetensors + configs. Interrupted runs resume from --work-dir.",
                "steps", "override the number of training steps"),
    "classifier": ("train-classifier", "retrain the bundled digits classifier used by FD-digits",
                   "Train the digits CNN classifier and write digits_classifier.safetensors + JSON. "
                   "Interrupted runs resume from --work-dir.",
                   "epochs", "override the number of epochs"),
}


def register(subparsers) -> None:
    """Add the ``train-teacher`` and ``train-classifier`` subcommands to ``subparsers``."""
    for model, (name, help, description, length, length_help) in _COMMANDS.items():
        p = add_parser(subparsers, name, help=help, description=description)
        p.add_argument("--config", default=None, help="JSON config (e.g. configs/digits_teacher.json); defaults "
                       "built in")
        p.add_argument("--seed", type=int, default=None, help="override the config seed")
        p.add_argument(f"--{length}", type=int, default=None, help=length_help)
        p.add_argument("--work-dir", default=f"out/train_{model}", help="checkpoint folder (resume)")
        if model == "teacher":
            p.add_argument("--snapshot-every", type=int, default=None, metavar="N",
                           help="keep the raw and EMA weights every N steps in WORK_DIR/checkpoints/ and the final "
                                "EMA in WORK_DIR/final/ (inputs of `fewstep lcsc --run WORK_DIR`); default: the "
                                "config's checkpoint_every (500); 0: none")
        p.add_argument("--output-dir", default=OUTPUT_DIRS[model],
                       help="folder the weights, their configs and the training record are written to, as one "
                            "unit; the installed package's weights/ only when named here")
        p.set_defaults(func=functools.partial(_train, model=model, override=length),
                       resume_hint=_resume_hint)


def _resume_hint(args: argparse.Namespace) -> str:
    return (f"progress up to the last checkpoint is saved in {Path(args.work_dir) / 'checkpoint.pt'}; rerun the same "
            "command to resume")
