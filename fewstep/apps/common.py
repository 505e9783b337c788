"""What ``fewstep sample`` and the Gradio demo share: model loading, device/dtype resolution,
guidance and label parsing, and one :func:`generate` call that runs a model with a named
scheduler and a guidance spec and reports images, NFE and wall time.

Models (:func:`load_model`):

* ``"digits"`` -- the bundled class-conditional 8x8 digits teacher (offline, package data);
* a local diffusers pipeline folder (``model_index.json`` inside);
* a Hugging Face Hub id, loaded with ``local_files_only=True`` (from the local cache) unless the
  caller opts in with ``allow_download=True`` (``--allow-download``).

Guidance specs (:func:`parse_guidance`): ``none``, ``cfg:2.0``, ``apg:scale=5,eta=0``,
``cfgpp:0.6``, ``ag:scale=2,threshold=0.99``, ``rescale:phi=0.7,scale=5``. A bare value is the
method's first parameter (its scale). Methods other than ``cfg`` come from :mod:`fewstep.guidance`
(its ``GUIDANCE_REGISTRY`` when it has one, otherwise its classes by name); without that
package only ``cfg`` and ``none`` work. Scale conventions are the guidance classes' (``cfg:w``
is diffusers' ``guidance_scale = w``; ``cfgpp:lambda`` is CFG++'s lambda in [0, 1]).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..device import resolve_device as _resolve_device
from .schedulers import get_entry, make_scheduler, parse_overrides, parse_value

DIGITS = "digits"
DTYPES = {
    "auto": None,
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
MAX_STEPS = 1000

# generation touches shared pipeline objects (scheduler swap, guidance hook): one at a time
_GENERATE_LOCK = threading.RLock()


# ------------------------------------------------------------------------------------------------
# device / dtype
# ------------------------------------------------------------------------------------------------
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
        dtype = torch.float32 if device.type == "cpu" or model == DIGITS else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A loaded pipeline and how to condition it.

    ``kind``: ``"digits"`` (the bundled teacher), ``"text"`` (takes ``prompt``), ``"class"``
    (a diffusers class-conditional pipeline, ``class_labels``) or ``"uncond"``.
    ``scheduler_defaults``: per scheduler name, keywords the model supplies (e.g. the shipped
    EMS for ``dpm-v3`` on digits); user overrides win.
    """

    name: str
    pipe: Any
    kind: str
    device: torch.device
    dtype: torch.dtype
    scheduler_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        # the pipeline's own scheduler config, read once: generate() swaps pipe.scheduler while it
        # runs, so a concurrent request reading the live one would inherit another request's settings
        self._scheduler_config = dict(self.pipe.scheduler.config)

    @property
    def base_scheduler_config(self) -> dict:
        return dict(self._scheduler_config)


_MODEL_CACHE: dict[tuple, LoadedModel] = {}


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


def _digits_scheduler_defaults() -> dict[str, dict[str, Any]]:
    try:
        from fewstep.samplers.ems import resolve_ems_path
    except ImportError:
        return {}
    out = {}
    for name in ("digits-cfg2", "digits"):
        try:
            resolve_ems_path(name)
        except (FileNotFoundError, ValueError):
            continue
        out["dpm-v3"] = {"ems": name}
        break
    return out


def load_model(spec: str = DIGITS, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto",
               allow_download: bool = False, cache: bool = True) -> LoadedModel:
    """Load ``spec`` (``"digits"``, a local diffusers pipeline folder or a hub id).

    Hub ids load from the local Hugging Face cache only, unless ``allow_download``.
    ``FileNotFoundError`` names what was looked for and how to opt in to a download.
    ``cache``: reuse a model already loaded with the same arguments (read-only sharing; every
    :func:`generate` call builds its own scheduler and guidance objects).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--model must be 'digits', a local diffusers folder or a hub id, got {spec!r}")
    spec = spec.strip()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, spec)
    key = (spec, str(dev), str(dt), bool(allow_download))
    if cache and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    if spec == DIGITS:
        from fewstep.models import load_digits_pipeline

        pipe = load_digits_pipeline(device=dev)
        pipe = pipe.to(dtype=dt) if dt != torch.float32 else pipe
        model = LoadedModel(DIGITS, pipe, "digits", dev, dt, _digits_scheduler_defaults())
    else:
        model = LoadedModel(spec, _load_diffusers(spec, dev, dt, allow_download), "", dev, dt)
        model.kind = _pipeline_kind(model.pipe)
    if cache:
        _MODEL_CACHE[key] = model
    return model


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and "\\" not in spec


def _load_diffusers(spec: str, device: torch.device, dtype: torch.dtype, allow_download: bool):
    from diffusers import DiffusionPipeline

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").exists():
            raise FileNotFoundError(f"--model {spec!r}: {path} is not a diffusers pipeline folder "
                                    "(no model_index.json); pass 'digits', a pipeline folder or a hub id")
        source = str(path)
    elif _looks_like_hub_id(spec):
        source = spec
    else:
        raise FileNotFoundError(f"--model {spec!r}: no such folder, and not a hub id (owner/name); "
                                "pass 'digits', a local diffusers pipeline folder or a hub id")
    try:
        with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; older ones need it
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, local_files_only=not allow_download)
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


# ------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------
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
    bad = [c for c in items if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--labels: {bad} out of range; class labels are integers 0..{num_classes - 1}")
    return [int(c) for c in items]


# ------------------------------------------------------------------------------------------------
# guidance
# ------------------------------------------------------------------------------------------------
# short name -> class name in fewstep.guidance (used when the package has no GUIDANCE_REGISTRY)
GUIDANCE_CLASS_NAMES = {
    "cfg": "CFG",
    "apg": "APG",
    "cfgpp": "CFGPlusPlus",
    "ag": "AdaptiveGuidance",
    "rescale": "GuidanceRescale",
}
GUIDANCE_ALIASES = {"cfg++": "cfgpp", "adaptive": "ag", "off": "none"}
# first positional value of each method ("cfg:2.0" -> scale=2.0)
_POSITIONAL = {"rescale": "phi"}


def guidance_registry() -> dict[str, type | None]:
    """Available guidance methods: short name -> :mod:`fewstep.guidance` class (``None`` for the
    built-in plain ``cfg`` when that package is absent). ``none`` is always available."""
    try:
        mod = importlib.import_module("fewstep.guidance")
    except ImportError:
        return {"none": None, "cfg": None}
    reg = getattr(mod, "GUIDANCE_REGISTRY", None)
    out: dict[str, type | None] = {"none": None}
    if isinstance(reg, Mapping) and reg:
        out.update({str(k).lower(): v for k, v in reg.items()})
    else:
        for short, cls_name in GUIDANCE_CLASS_NAMES.items():
            cls = getattr(mod, cls_name, None)
            if cls is not None:
                out[short] = cls
    out.setdefault("cfg", None)
    return out


def guidance_names() -> list[str]:
    return list(guidance_registry())


def guidance_parameters(method: str) -> dict[str, Any]:
    """Scalar keyword parameters of a method and their defaults (for help texts and the demo)."""
    reg = guidance_registry()
    cls = reg.get(method)
    if cls is None:
        return {"scale": 2.0} if method == "cfg" else {}
    out = {}
    for n, p in inspect.signature(cls.__init__).parameters.items():
        if n in ("self", "guidance") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[n] = None if p.default is inspect.Parameter.empty else p.default
    return out


@dataclass
class GuidanceSpec:
    """A parsed ``--guidance``: ``method`` (short name), its keyword ``params`` and ``text`` (the
    canonical spec). :meth:`build` makes a fresh guidance object per generation (state such as
    APG momentum never leaks between runs); ``scale`` is the plain CFG scale when ``method`` is
    ``cfg`` or ``none`` (then no object is needed)."""

    method: str
    params: dict[str, Any]

    @property
    def text(self) -> str:
        if self.method == "none":
            return "none"
        return self.method + (":" + ",".join(f"{k}={v}" for k, v in self.params.items()) if self.params else "")

    @property
    def is_plain(self) -> bool:
        """True for ``none`` and ``cfg`` (run through the pipeline's own ``guidance_scale``)."""
        return self.method in ("none", "cfg")

    @property
    def scale(self) -> float:
        if self.method == "none":
            return 1.0
        return float(self.params.get("scale", 2.0))

    def build(self):
        """A new :class:`fewstep.guidance.Guidance` (``None`` for ``none``)."""
        if self.method == "none":
            return None
        cls = guidance_registry().get(self.method)
        if cls is None:  # plain cfg without fewstep.guidance
            return None
        try:
            return cls(**self.params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--guidance {self.text!r}: {err}") from None


def parse_guidance(spec: str | None) -> GuidanceSpec:
    """Parse ``method[:value][,key=value...]`` (see the module docstring); ``ValueError`` naming
    the bad part and what is allowed. ``None``/``""`` mean ``none``."""
    if spec is None or not str(spec).strip():
        return GuidanceSpec("none", {})
    text = str(spec).strip()
    method, _, rest = text.partition(":")
    method = method.strip().lower()
    method = GUIDANCE_ALIASES.get(method, method)
    reg = guidance_registry()
    if method not in reg:
        known = [m for m in GUIDANCE_CLASS_NAMES if m not in reg]
        hint = (f" ({', '.join(known)} need fewstep.guidance, which does not provide them here)"
                if method in known else "")
        raise ValueError(f"--guidance {text!r}: unknown method {method!r}; allowed: {', '.join(reg)}{hint}")
    allowed = guidance_parameters(method)
    params: dict[str, Any] = {}
    for i, item in enumerate(p for p in rest.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        if not sep:
            if i != 0:
                raise ValueError(f"--guidance {text!r}: {item!r} must be key=value (only the first value may be bare)")
            key, value = _POSITIONAL.get(method, "scale"), item
        key = key.strip()
        if key not in allowed:
            raise ValueError(f"--guidance {text!r}: parameter {key!r} is not accepted by {method}; "
                             f"allowed: {', '.join(allowed) or '(none)'}")
        val = parse_value(value)
        default = allowed[key]
        if isinstance(default, bool):
            if not isinstance(val, bool):
                raise ValueError(f"--guidance {text!r}: {key} must be true or false, got {value.strip()!r}")
        elif default is None or isinstance(default, (int, float)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                raise ValueError(f"--guidance {text!r}: {key} must be a finite number, got {value.strip()!r}")
            if isinstance(default, int):
                if not float(val).is_integer():
                    raise ValueError(f"--guidance {text!r}: {key} must be an integer, got {value.strip()!r}")
                val = int(val)
            else:
                val = float(val)
        else:
            val = str(val)
        params[key] = val
    if method == "none" and params:
        raise ValueError(f"--guidance {text!r}: 'none' takes no parameters")
    if method == "cfg" and "scale" not in params:
        params["scale"] = 2.0
    out = GuidanceSpec(method, params)
    if method == "cfg":
        s = out.scale
        if s < 0:
            raise ValueError(f"--guidance {text!r}: cfg scale must be >= 0, got {s}")
    out.build()  # validate the values now (ranges are the guidance class's)
    return out


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """Images (PIL) with their labels/prompts, NFE per image, wall time and the settings used."""

    images: list
    nfe: int
    wall_time: float
    settings: dict
    captions: list = field(default_factory=list)


def check_steps(steps, low: int = 1, high: int = MAX_STEPS) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) and not (
            isinstance(steps, float) and float(steps).is_integer()):
        raise ValueError(f"steps must be an integer in {low}..{high}, got {steps!r}")
    steps = int(steps)
    if not low <= steps <= high:
        raise ValueError(f"steps must be in {low}..{high}, got {steps}")
    return steps


def check_seed(seed) -> int:
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in 0..2**63-1, got {seed!r}")
    return int(seed)


def digits_ems_for(gspec: "GuidanceSpec") -> dict[str, Any]:
    """The shipped digits EMS that matches the guidance: DPM-Solver-v3's statistics are those of the
    guided model, so CFG at scale 2 uses ``digits-cfg2`` and unguided sampling ``digits`` (other
    methods and scales fall back to the nearer of the two). Empty when neither file is installed."""
    unguided = gspec.method == "none" or (gspec.is_plain and gspec.scale == 1.0)
    names = ("digits", "digits-cfg2") if unguided else ("digits-cfg2", "digits")
    try:
        from fewstep.samplers.ems import resolve_ems_path
    except ImportError:
        return {}
    for name in names:
        try:
            resolve_ems_path(name)
        except (FileNotFoundError, ValueError):
            continue
        return {"ems": name}
    return {}


def build_scheduler(model: LoadedModel, name: str, overrides: Mapping[str, Any] | str | None = None):
    """The scheduler ``name`` for ``model`` (its scheduler config + model defaults + overrides)."""
    if isinstance(overrides, (str, list)):
        overrides = parse_overrides(overrides)
    entry = get_entry(name)
    merged = {**model.scheduler_defaults.get(name, {}), **dict(overrides or {})}
    return make_scheduler(entry.name, model.base_scheduler_config, merged)


@contextlib.contextmanager
def _swapped(pipe, scheduler, progress: bool):
    old_sched = pipe.scheduler
    old_cfg = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.scheduler = scheduler
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress)
    try:
        yield
    finally:
        pipe.scheduler = old_sched
        pipe._progress_bar_config = old_cfg


class _CallCounter:
    """Counts denoiser forward calls (NFE for pipelines run with their built-in CFG)."""

    def __init__(self, module):
        self.calls = 0
        self._h = module.register_forward_pre_hook(self._hook) if module is not None else None

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        if self._h is not None:
            self._h.remove()


def _to_pil_list(images) -> list:
    if isinstance(images, list) and (not images or isinstance(images[0], Image.Image)):
        return images
    if isinstance(images, torch.Tensor):
        arr = images.detach().cpu().float().permute(0, 2, 3, 1).numpy()
    else:
        arr = np.asarray(images)
    arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], "L") for a in arr]
    return [Image.fromarray(a) for a in arr]


def _upscale(img: Image.Image, factor: int) -> Image.Image:
    if factor <= 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def auto_upscale(img: Image.Image, target: int = 64) -> int:
    """Nearest-neighbour factor that brings small images (digits are 8x8) to about ``target`` px."""
    return max(1, target // max(1, min(img.size)))


def generate(model: LoadedModel, scheduler: str = "dpmpp-2m", steps: int = 8, guidance: str | GuidanceSpec = "cfg:2.0",
             seed: int = 0, n: int = 4, labels: str | Sequence[int] | None = None, prompt: str | None = None,
             negative_prompt: str | None = None, scheduler_config: Mapping[str, Any] | str | list | None = None,
             batch_size: int | None = None, progress: bool = False, max_steps: int = MAX_STEPS,
             upscale: int | None = None) -> GenerationResult:
    """Generate ``n`` images with ``model`` and the named scheduler / guidance.

    ``labels`` (class models) are cycled over the ``n`` images; ``prompt`` is required by text
    models. The initial noise of the whole run comes from ``torch.Generator().manual_seed(seed)``
    on the CPU (same images on any device up to numerics), drawn batch by batch. ``nfe`` is model
    evaluations per image (a guided step with both branches counts 2). ``upscale``: integer
    nearest-neighbour factor for the returned images (``None``: automatic for tiny images).
    Raises ``ValueError`` naming the bad argument.
    """
    steps = check_steps(steps, 1, max_steps)
    seed = check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (number of images) must be an integer >= 1, got {n!r}")
    n = int(n)
    batch_size = n if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    gspec = guidance if isinstance(guidance, GuidanceSpec) else parse_guidance(guidance)
    if isinstance(scheduler_config, (str, list)):
        overrides = parse_overrides(scheduler_config)
    else:
        overrides = dict(scheduler_config or {})
    if scheduler == "dpm-v3" and model.kind == "digits" and "ems" not in overrides:
        overrides = {**overrides, **digits_ems_for(gspec)}
    sched = build_scheduler(model, scheduler, overrides)  # validates name and overrides
    gobj = gspec.build()
    if gobj is not None and getattr(gobj, "needs_renoise", False) and not getattr(sched, "supports_renoise", False):
        raise ValueError(f"--guidance {gspec.text}: needs a scheduler that can renoise (fewstep's ddim, dpmpp-*, "
                         f"dpm-v3), not {scheduler!r}")

    conds: list
    if model.kind in ("digits", "class"):
        if prompt:
            raise ValueError(f"model {model.name!r} is class-conditional: use labels, not a prompt")
        lab = parse_labels(labels, 10 if model.kind == "digits" else _num_classes(model.pipe))
        conds = [lab[i % len(lab)] for i in range(n)]
    elif model.kind == "text":
        if not prompt or not str(prompt).strip():
            raise ValueError(f"model {model.name!r} is a text-to-image pipeline: give a prompt")
        conds = [str(prompt)] * n
    else:
        if gspec.method != "none":
            raise ValueError(f"model {model.name!r} is unconditional: use --guidance none")
        conds = [None] * n
    if not gspec.is_plain and model.kind == "class":
        raise ValueError(f"--guidance {gspec.text}: only cfg/none work with diffusers class-conditional pipelines")

    settings = {
        "model": model.name, "kind": model.kind, "scheduler": scheduler,
        "scheduler_class": type(sched).__name__, "scheduler_overrides": _jsonable(overrides),
        "steps": steps, "guidance": gspec.text, "seed": seed, "n": n, "batch_size": batch_size,
        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
    }
    if model.kind in ("digits", "class"):
        settings["labels"] = conds
    if model.kind == "text":
        settings["prompt"] = prompt
        if negative_prompt:
            settings["negative_prompt"] = negative_prompt

    gen = torch.Generator("cpu").manual_seed(seed)
    images: list = []
    nfe = 0
    with _GENERATE_LOCK:
        t0 = time.perf_counter()
        for start in range(0, n, batch_size):
            chunk = conds[start:start + batch_size]
            sched_b = sched if start == 0 else build_scheduler(model, scheduler, overrides)
            imgs, used = _run_batch(model, sched_b, steps, gspec, chunk, gen, progress, negative_prompt)
            images.extend(imgs)
            nfe = max(nfe, used)
        wall = time.perf_counter() - t0
    factor = upscale if upscale is not None else auto_upscale(images[0])
    images = [_upscale(im, int(factor)) for im in images]
    settings["upscale"] = int(factor)
    captions = [str(c) if c is not None else "" for c in conds]
    return GenerationResult(images, int(nfe), wall, settings, captions)


def _num_classes(pipe) -> int:
    for attr in ("transformer", "unet"):
        mod = getattr(pipe, attr, None)
        cfg = getattr(mod, "config", None)
        for key in ("num_embeds_ada_norm", "num_class_embeds"):
            v = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(v, int) and v > 0:
                return v
    return 1000


def _jsonable(d: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v, allow_nan=True)
            out[k] = v
        except TypeError:
            out[k] = repr(v)
    return out


def _run_batch(model: LoadedModel, sched, steps: int, gspec: GuidanceSpec, conds: list, gen: torch.Generator,
               progress: bool, negative_prompt: str | None) -> tuple[list, int]:
    pipe = model.pipe
    b = len(conds)
    if model.kind == "digits":
        return _run_digits(model, sched, steps, gspec, conds, gen, progress)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    gobj = gspec.build()
    with _swapped(pipe, sched, progress):
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": gen, "output_type": "pil"}
        if model.kind == "text":
            kwargs["prompt"] = conds
            if negative_prompt:
                kwargs["negative_prompt"] = [negative_prompt] * b
        elif model.kind == "class":
            kwargs["class_labels"] = conds
        else:
            kwargs["batch_size"] = b
        if model.kind in ("text", "class"):
            kwargs["guidance_scale"] = gspec.scale
        if gobj is not None:
            from fewstep.guidance import attach

            kwargs["guidance_scale"] = max(2.0, gspec.scale)  # the pipeline's CFG branch must run
            handle = attach(pipe, gobj)
            try:
                out = pipe(**kwargs)
            finally:
                handle.detach()
            used = handle.nfe
        else:
            counter = _CallCounter(denoiser)
            try:
                out = pipe(**kwargs)
            finally:
                counter.remove()
            doubled = bool(getattr(pipe, "do_classifier_free_guidance", False))
            used = counter.calls * (2 if doubled else 1)
    return _to_pil_list(out.images), used


def _run_digits(model: LoadedModel, sched, steps: int, gspec: GuidanceSpec, labels: list, gen: torch.Generator,
                progress: bool) -> tuple[list, int]:
    """Digits: the noise of this batch from ``gen``, then ``DigitsPipeline`` (:func:`fewstep.sample`)
    with the guidance object, or plain CFG at the spec's scale."""
    pipe = model.pipe
    unet = pipe.unet
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    noise = torch.randn((len(labels), unet.config.in_channels, *size), generator=gen, dtype=torch.float32)
    noise = noise.to(model.device, model.dtype)
    with _swapped(pipe, sched, progress):
        out = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=gspec.scale, guidance=gspec.build(),
                   generator=gen, latents=noise, output_type="pt")
    return _to_pil_list(out.images), int(out.nfe)


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2, background=0) -> Image.Image:
    """Tile equal-size PIL images into one image (``ncols`` default ``ceil(sqrt(n))``)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    w, h = images[0].size
    mode = "RGB" if any(im.mode != "L" for im in images) else "L"
    bg = background if mode == "L" else (background,) * 3
    grid = Image.new(mode, (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), bg)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im.convert(mode), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
