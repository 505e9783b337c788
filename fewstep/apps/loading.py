"""Models for ``fewstep sample`` and the demo: device/dtype resolution and :func:`load_model`.

Models:

* ``"digits"`` -- the bundled class-conditional 8x8 digits teacher (offline, package data);
* a local diffusers pipeline folder (``model_index.json`` inside);
* a Hugging Face Hub id, loaded with ``local_files_only=True`` (from the local cache) unless the
  caller opts in with ``allow_download=True`` (``--allow-download``).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device as _resolve_device
from ..guidance.spec import GuidanceSpec
from .options import DIGITS, DTYPE_NAMES, check_model_path, is_digits_model, student_of

DTYPES = dict(zip(DTYPE_NAMES, (None, torch.float32, torch.float32, torch.float16, torch.float16, torch.float16,
                                torch.bfloat16, torch.bfloat16)))


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """:func:`fewstep.device.resolve_device` with messages naming the ``--device`` option."""
    return _resolve_device(spec, name="--device")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, model: str = "") -> torch.dtype:
    """``auto`` -> float32 on CPU and for the (tiny) digits model, float16 on CUDA/MPS otherwise;
    else one of float32/fp32, float16/fp16/half, bfloat16/bf16."""
    if isinstance(spec, torch.dtype):
        return spec
    key = (spec or "auto").strip().lower()
    if key not in DTYPES:
        raise ValueError(f"--dtype {spec!r} is not supported; allowed: {', '.join(DTYPES)}")
    dtype = DTYPES[key]
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" or is_digits_model(model) else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


@dataclass
class LoadedModel:
    """A loaded pipeline and how to condition it.

    ``kind``: ``"digits"`` (the bundled teacher), ``"text"`` (takes ``prompt``), ``"class"``
    (a diffusers class-conditional pipeline, ``class_labels``) or ``"uncond"``.
    ``scheduler_defaults``: per scheduler name, keywords the model supplies (e.g. the shipped
    EMS for ``dpm-v3`` on digits); user overrides win. ``student``: a distilled digits student
    (``digits-cd``...): it samples only with its own ``consistency`` scheduler, guidance built in.
    """

    name: str
    pipe: Any
    kind: str
    device: torch.device
    dtype: torch.dtype
    scheduler_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    student: bool = False

    def __post_init__(self):
        # the pipeline's own scheduler config, read once: generate() swaps pipe.scheduler while it
        # runs, so a concurrent request reading the live one would inherit another request's settings
        self._scheduler_config = dict(self.pipe.scheduler.config)

    @property
    def base_scheduler_config(self) -> dict:
        return dict(self._scheduler_config)


_MODEL_CACHE: dict[tuple, LoadedModel] = {}


def digits_ems_for(gspec: GuidanceSpec) -> dict[str, Any]:
    """The shipped digits EMS that matches the guidance: DPM-Solver-v3's statistics are those of the
    guided model, so CFG at scale 2 uses ``digits-cfg2`` and unguided sampling ``digits`` (other
    methods and scales fall back to the nearer of the two). Empty when neither file is installed."""
    from ..samplers.ems import resolve_ems_path

    unguided = gspec.method == "none" or (gspec.is_plain and gspec.scale == 1.0)
    for name in ("digits", "digits-cfg2") if unguided else ("digits-cfg2", "digits"):
        try:
            resolve_ems_path(name)
        except (FileNotFoundError, ValueError):
            continue
        return {"ems": name}
    return {}


def _pipeline_kind(pipe) -> str:
    if type(pipe).__name__ == "DigitsPipeline":
        return "digits"
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    if "prompt" in params:
        return "text"
    if "class_labels" in params:
        return "class"
    return "uncond"


def load_model(spec: str = DIGITS, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto",
               allow_download: bool = False, cache: bool = True) -> LoadedModel:
    """Load ``spec`` (``"digits"``, a local diffusers pipeline folder or a hub id).

    Hub ids load from the local Hugging Face cache only, unless ``allow_download``.
    ``FileNotFoundError`` names what was looked for and how to opt in to a download.
    ``cache``: reuse a model already loaded with the same arguments (read-only sharing; every
    :func:`fewstep.apps.generate.generate` call builds its own scheduler and guidance objects).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--model must be 'digits', a local diffusers folder or a hub id, got {spec!r}")
    spec = spec.strip()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, spec)
    key = (spec, str(dev), str(dt), bool(allow_download))
    if cache and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    if student_of(spec) is not None:
        from ..models import load_digits_pipeline

        check_model_path(spec)
        pipe = load_digits_pipeline(device=dev, student=student_of(spec))
        pipe = pipe.to(dtype=dt) if dt != torch.float32 else pipe
        model = LoadedModel(spec, pipe, "digits", dev, dt, student=True)
    elif spec == DIGITS:
        from ..models import load_digits_pipeline

        pipe = load_digits_pipeline(device=dev)
        pipe = pipe.to(dtype=dt) if dt != torch.float32 else pipe
        # dpm-v3 keeps the teacher's trailing grid on digits: v3's own default (time_power_zero) is 1.4x
        # worse there at 4-6 steps and better from 8 on (docs/dpm-v3.md, "The digits teacher")
        defaults = {"dpm-v3": {**digits_ems_for(GuidanceSpec("cfg", {"scale": 2.0})), "timestep_spacing": "trailing"}}
        model = LoadedModel(DIGITS, pipe, "digits", dev, dt, defaults)
    else:
        model = LoadedModel(spec, _load_diffusers(spec, dev, dt, allow_download), "", dev, dt)
        model.kind = _pipeline_kind(model.pipe)
    if cache:
        _MODEL_CACHE[key] = model
    return model


#: pipeline classes fewstep defines (``_class_name`` in a saved folder's model_index.json) -> where they live;
#: diffusers' own loader looks them up in the diffusers package and fails
FEWSTEP_PIPELINES = {"DigitsPipeline": "fewstep.models.pipeline:DigitsPipeline"}


def _pipeline_class(path: Path):
    """The class that loads the pipeline folder ``path``: a fewstep pipeline named in its
    ``model_index.json`` (``DigitsPipeline.save_pretrained`` output), else diffusers'
    ``DiffusionPipeline`` (which resolves diffusers' own classes)."""
    from diffusers import DiffusionPipeline

    from .._imports import load_callable
    from .._io import read_json

    index = path / "model_index.json"
    if not index.is_file():
        return DiffusionPipeline
    name = read_json(index, f"--model {str(path)!r}: model_index.json")
    name = name.get("_class_name") if isinstance(name, dict) else None
    return load_callable(FEWSTEP_PIPELINES[name], "pipeline class") if name in FEWSTEP_PIPELINES else DiffusionPipeline


def _load_diffusers(spec: str, device: torch.device, dtype: torch.dtype, allow_download: bool):
    check_model_path(spec)
    path = Path(spec).expanduser()
    source = str(path) if path.exists() else spec
    pipeline_class = _pipeline_class(path)
    try:
        with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; older ones need it
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = pipeline_class.from_pretrained(source, torch_dtype=dtype, local_files_only=not allow_download)
    except (OSError, EnvironmentError, ValueError) as err:
        if source == spec and not path.exists() and not allow_download:
            raise FileNotFoundError(
                f"--model {spec!r} is not in the local Hugging Face cache and downloads are off; "
                "pass --allow-download (demo: allow_download=True) to fetch it from the Hub") from err
        raise FileNotFoundError(f"--model {spec!r} could not be loaded: {err}") from err
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
