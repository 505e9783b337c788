"""What the ``fewstep`` subcommands share before any model loads: option definitions, the help
formatter, cheap argument checks and the thread setting.

Nothing here imports torch, diffusers or gradio, so ``fewstep --help`` and argument errors are
fast; the subcommands import the heavy modules only after their arguments passed these checks.
"""

from __future__ import annotations

import argparse
import numbers
import os
import textwrap
from pathlib import Path
from typing import Sequence

DIGITS = "digits"
#: ``--dtype`` names (their torch dtypes: :data:`fewstep.apps.loading.DTYPES`)
DTYPE_NAMES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
MAX_STEPS = 1000
#: shipped distilled students are ``--model digits-NAME`` (files ``models/weights/digits_NAME.json``)
STUDENT_PREFIX = "digits-"
_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"


def digits_students() -> list[str]:
    """The shipped digits students' names (``cd``, ``lcm``, ...), from the package's weight files."""
    return sorted(p.stem[len("digits_"):] for p in _WEIGHTS.glob("digits_*.json")
                  if (_WEIGHTS / f"{p.stem}_unet.safetensors").exists())


def student_of(spec) -> str | None:
    """``"cd"`` for ``--model digits-cd`` (a shipped distilled student), None for any other model."""
    if isinstance(spec, str) and spec.startswith(STUDENT_PREFIX) and not Path(spec).exists():
        return spec[len(STUDENT_PREFIX):]
    return None


def is_digits_model(spec) -> bool:
    """The bundled teacher or one of its shipped students (tiny class-conditional 8x8 models)."""
    return spec == DIGITS or student_of(spec) is not None


def default_scheduler(spec) -> str:
    """``--scheduler`` when not given: the student's own consistency sampler, else DPM-Solver++(2M)."""
    return "consistency" if student_of(spec) is not None else "dpmpp-2m"


def default_guidance(spec) -> str:
    """``--guidance`` when not given: none for students (guidance is distilled in), else CFG 2."""
    return "none" if student_of(spec) is not None else "cfg:2.0"


class HelpFormatter(argparse.HelpFormatter):
    """A description with line breaks is printed as written (examples), a one-paragraph one is
    wrapped; an option's help gets ``(default: X)`` unless it has no real default (None, False,
    an empty list) or already says what its default is."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        no_default = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "default" in text or no_default or action.required or not action.option_strings:
            return text
        if text.endswith(")"):  # "name (see --list-x)" -> "name (see --list-x; default: y)"
            return f"{text[:-1]}; default: {default})"
        return f"{text} (default: {default})"


def add_parser(subparsers, name: str, help: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser with fewstep's help formatter."""
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter, **kwargs)


# ------------------------------------------------------------------------------------------------
# shared options
# ------------------------------------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser, model_help: str) -> None:
    """``--model``, ``--allow-download``, ``--device``, ``--dtype`` (sample, demo)."""
    p.add_argument("--model", default=DIGITS, help=model_help)
    p.add_argument("--allow-download", action="store_true",
                   help="allow fetching a hub id from the Hugging Face Hub (off: local files only)")
    add_device_option(p)
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, metavar="DTYPE",
                   help="auto (float32 on CPU and for digits, float16 on GPU), float32, float16 or bfloat16")


def add_device_option(p: argparse.ArgumentParser, choices: Sequence[str] | None = None) -> None:
    p.add_argument("--device", default="auto", choices=choices,
                   help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps" if choices is None
                   else f"where the network runs: {', '.join(choices)}")


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads N|auto`` (see :func:`resolve_threads`)."""
    p.add_argument("--threads", default="auto", metavar="N",
                   help="CPU threads of torch and OpenMP, or auto: 1 for the bundled digits models (too small "
                        "for threads to pay off), else $OMP_NUM_THREADS or torch's default (one per core)")


def check_threads(value) -> int | None:
    """``--threads`` -> an int >= 1, or None for ``auto``; ``ValueError`` otherwise."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(f"--threads must be an integer >= 1 or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"--threads must be an integer >= 1 or 'auto', got {value!r}")
    return n


def resolve_threads(value, tiny: bool) -> int | None:
    """The thread count to use: an explicit ``--threads``; for ``auto``, 1 when ``tiny`` (the
    bundled digits models) unless ``$OMP_NUM_THREADS`` says otherwise; None (leave torch's
    default) for other models."""
    n = check_threads(value)
    if n is not None:
        return n
    if tiny and not os.environ.get("OMP_NUM_THREADS"):
        return 1
    return None


def apply_threads(value, tiny: bool) -> int | None:
    """Set torch's intra-op threads and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (read by OpenMP
    when torch first loads, and inherited by worker processes) from ``--threads``; returns the
    count set, or None when torch's default is kept."""
    n = resolve_threads(value, tiny)
    if n is None:
        return None
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------------
# cheap checks
# ------------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_steps(steps, low: int = 1, high: int = MAX_STEPS) -> int:
    if not _is_int(steps) and not (isinstance(steps, float) and float(steps).is_integer()):
        raise ValueError(f"steps must be an integer in {low}..{high}, got {steps!r}")
    steps = int(steps)
    if not low <= steps <= high:
        raise ValueError(f"steps must be in {low}..{high}, got {steps}")
    return steps


def check_seed(seed) -> int:
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in 0..2**63-1, got {seed!r}")
    return int(seed)


def check_positive(name: str, value, allow_none: bool = False) -> None:
    """``ValueError`` unless ``value`` is an int >= 1 (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def parse_labels(spec: str | Sequence[int] | None, num_classes: int = 10) -> list[int]:
    """``"0-9"``, ``"3,7"``, ``"0-4,7"`` or a list of ints -> list of ints in ``0..num_classes-1``."""
    if spec is None:
        return list(range(num_classes))
    if isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        text = str(spec).replace(" ", "")
        if not text:
            raise ValueError("--labels is empty; give e.g. 0-9 or 3,7")
        items = []
        for part in text.split(","):
            a, sep, b = part.partition("-")
            try:
                if sep:
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise ValueError
                    items.extend(range(lo, hi + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise ValueError(f"--labels {spec!r}: {part!r} is not an integer or a range lo-hi; "
                                 "give e.g. 0-9 or 3,7") from None
    bad = [c for c in items if not _is_int(c) or not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--labels: {bad} out of range; class labels are integers 0..{num_classes - 1}")
    return [int(c) for c in items]


def check_model_path(spec: str) -> None:
    """The checks of ``--model`` that need no import: ``FileNotFoundError`` for a path that is not
    a diffusers pipeline folder, or a spec that is neither a folder, a hub id nor ``digits``."""
    if spec == DIGITS:
        return
    student = student_of(spec)
    if student is not None:
        if student not in digits_students():
            raise FileNotFoundError(f"--model {spec!r}: no shipped digits student {student!r}; allowed: "
                                    + ", ".join(STUDENT_PREFIX + s for s in digits_students()))
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").exists():
            raise FileNotFoundError(f"--model {spec!r}: {path} is not a diffusers pipeline folder "
                                    "(no model_index.json); pass 'digits', a pipeline folder or a hub id")
    elif not looks_like_hub_id(spec):
        raise FileNotFoundError(f"--model {spec!r}: no such folder, and not a hub id (owner/name); "
                                "pass 'digits', a local diffusers pipeline folder or a hub id")


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and "\\" not in spec
