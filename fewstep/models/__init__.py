"""The bundled digits teacher: data split, v-prediction UNet pipeline and FD-digits classifier.

Public API (imported lazily, so ``import fewstep.models`` is cheap):

- :func:`load_digits_split` -- the fixed train/test split of the scikit-learn digits, in [-1, 1].
- :class:`DigitsPipeline` and :func:`load_digits_pipeline` -- the shipped class-conditional
  teacher as a diffusers pipeline, loaded offline from package data.
- :func:`load_digits_classifier` -- the shipped classifier whose penultimate features define
  FD-digits.
- :func:`shipped_file` -- the path of a file shipped with fewstep (weights, configs, EMS).
- :class:`DigitsStudentPipeline`, :class:`GuidanceUNet2DModel` -- distilled consistency students
  (``load_digits_pipeline(student="cd" | "lcm")``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

_EXPORTS = {
    "load_digits_split": ".digits",
    "DigitsPipeline": ".pipeline",
    "DigitsPipelineOutput": ".pipeline",
    "load_digits_pipeline": ".pipeline",
    "load_digits_classifier": ".classifier",
    "DigitsClassifier": ".classifier",
    "denoiser": ".adapters",
    "Denoiser": ".adapters",
    "DigitsStudentPipeline": ".students",
    "GuidanceUNet2DModel": ".students",
}

__all__ = sorted([*_EXPORTS, "shipped_file"])

_WEIGHTS = Path(__file__).resolve().parent / "weights"


def shipped_file(name: str) -> Path:
    """The path of ``name``, a file shipped in fewstep's package data (``fewstep/models/weights``:
    the digits teacher, classifier, scheduler config and EMS). ``ValueError`` for anything but a plain
    file name, ``FileNotFoundError`` naming the path when the file is not installed."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name must be a plain file name, got {name!r}")
    path = _WEIGHTS / name
    if not path.is_file():
        raise FileNotFoundError(f"the shipped file {name!r} ({path}) is not installed; reinstall fewstep")
    return path


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
