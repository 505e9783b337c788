"""One :func:`generate` call for ``fewstep sample`` and the demo: a loaded model, a scheduler by
short name (:mod:`fewstep.samplers.registry`) and a guidance spec (:mod:`fewstep.guidance.spec`)
-> images, NFE per image and wall time.

The digits teacher runs through ``DigitsPipeline`` (that is, :func:`fewstep.sample`); diffusers
pipelines run their own loop, with guidance objects hooked in by :func:`fewstep.guidance.attach`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..guidance.spec import GuidanceSpec, parse_guidance
from ..samplers.registry import get_entry, make_scheduler, parse_overrides
from .images import auto_upscale, to_pil_list, upscale
from .loading import LoadedModel, digits_ems_for
from .options import (
    MAX_STEPS,
    check_positive,
    check_seed,
    check_steps,
    default_guidance,
    default_scheduler,
    parse_labels,
)

# generation with a diffusers pipeline touches shared pipeline objects (scheduler swap, guidance hook): one at
# a time. The digits teacher runs on a per-request pipeline around the shared (read-only) UNet: no lock.
_GENERATE_LOCK = threading.RLock()


@dataclass
class GenerationResult:
    """Images (PIL) with their labels/prompts, NFE per image, wall time and the settings used."""

    images: list
    nfe: int
    wall_time: float
    settings: dict
    captions: list = field(default_factory=list)


def build_scheduler(model: LoadedModel, name: str, overrides: Mapping[str, Any] | str | None = None):
    """The scheduler ``name`` for ``model`` (its scheduler config + model defaults + overrides)."""
    if isinstance(overrides, (str, list)):
        overrides = parse_overrides(overrides)
    entry = get_entry(name)
    merged = {**model.scheduler_defaults.get(name, {}), **dict(overrides or {})}
    return make_scheduler(entry.name, model.base_scheduler_config, merged)


def generate(model: LoadedModel, scheduler: str | None = None, steps: int = 8,
             guidance: str | GuidanceSpec | None = None,
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
    ``scheduler`` / ``guidance`` None: the model's defaults (``dpmpp-2m`` and ``cfg:2.0``; a
    distilled student's ``consistency`` sampler and no guidance rule).
    Raises ``ValueError`` naming the bad argument.
    """
    steps = check_steps(steps, 1, max_steps)
    seed = check_seed(seed)
    check_positive("n (number of images)", n)
    n = int(n)
    batch_size = n if batch_size is None else int(batch_size)
    check_positive("batch size", batch_size)
    scheduler = scheduler or default_scheduler(model.name)
    guidance = guidance or default_guidance(model.name)
    gspec = guidance if isinstance(guidance, GuidanceSpec) else parse_guidance(guidance, name="--guidance")
    if model.student:
        if scheduler != "consistency":
            raise ValueError(f"--scheduler {scheduler!r}: model {model.name!r} is a distilled student and samples "
                             "only with its own scheduler; use --scheduler consistency")
        if not gspec.is_plain:
            raise ValueError(f"--guidance {gspec.text}: a distilled student has its guidance built in; use "
                             "none (or cfg:W for a student trained with a guidance input, e.g. digits-lcm)")
    if isinstance(scheduler_config, (str, list)):
        overrides = parse_overrides(scheduler_config)
    else:
        overrides = dict(scheduler_config or {})
    if scheduler == "dpm-v3" and model.kind == "digits" and "ems" not in overrides:
        overrides = {**overrides, **digits_ems_for(gspec)}
    sched = build_scheduler(model, scheduler, overrides)  # validates name and overrides
    gobj = gspec.build()
    if gobj is not None and gobj.needs_renoise and not getattr(sched, "supports_renoise", False):
        raise ValueError(f"--guidance {gspec.text}: needs a scheduler that can renoise (fewstep's ddim, dpmpp-*, "
                         f"dpm-v3), not {scheduler!r}")
    conds = _conditions(model, gspec, n, labels, prompt)
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
    with contextlib.nullcontext() if model.kind == "digits" else _GENERATE_LOCK:
        t0 = time.perf_counter()
        for start in range(0, n, batch_size):
            chunk = conds[start:start + batch_size]
            sched_b = sched if start == 0 else build_scheduler(model, scheduler, overrides)
            run = _run_digits if model.kind == "digits" else _run_diffusers
            imgs, used = run(model, sched_b, steps, gspec, chunk, gen, progress, negative_prompt)
            images.extend(imgs)
            nfe = max(nfe, used)
        wall = time.perf_counter() - t0
    factor = upscale if upscale is not None else auto_upscale(images[0])
    images = [_upscale(im, int(factor)) for im in images]
    settings["upscale"] = int(factor)
    captions = [str(c) if c is not None else "" for c in conds]
    return GenerationResult(images, int(nfe), wall, settings, captions)


_upscale = upscale  # generate() has an argument of that name


def _conditions(model: LoadedModel, gspec: GuidanceSpec, n: int, labels, prompt) -> list:
    """One condition per image (labels cycled, the prompt repeated, or None); ``ValueError`` when
    the inputs do not fit the model."""
    if model.kind in ("digits", "class"):
        if prompt:
            raise ValueError(f"model {model.name!r} is class-conditional: use labels, not a prompt")
        if not gspec.is_plain and model.kind == "class":
            raise ValueError(f"--guidance {gspec.text}: only cfg/none work with diffusers class-conditional "
                             "pipelines")
        lab = parse_labels(labels, 10 if model.kind == "digits" else _num_classes(model.pipe))
        return [lab[i % len(lab)] for i in range(n)]
    if model.kind == "text":
        if not prompt or not str(prompt).strip():
            raise ValueError(f"model {model.name!r} is a text-to-image pipeline: give a prompt")
        return [str(prompt)] * n
    if gspec.method != "none":
        raise ValueError(f"model {model.name!r} is unconditional: use --guidance none")
    return [None] * n


def _num_classes(pipe) -> int:
    for attr in ("transformer", "unet"):
        cfg = getattr(getattr(pipe, attr, None), "config", None)
        for key in ("num_embeds_ada_norm", "num_class_embeds"):
            v = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(v, numbers.Integral) and v > 0:
                return int(v)
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


def _run_digits(model: LoadedModel, sched, steps: int, gspec: GuidanceSpec, labels: list, gen: torch.Generator,
                progress: bool, negative_prompt: str | None = None) -> tuple[list, int]:
    """Digits: the noise of this batch from ``gen``, then ``DigitsPipeline`` (:func:`fewstep.sample`)
    with the guidance object, or plain CFG at the spec's scale. The pipeline is this request's own
    (a shallow copy sharing the read-only UNet, with this request's scheduler), so concurrent
    requests share nothing mutable."""
    unet = model.pipe.unet
    pipe = copy.copy(model.pipe)  # diffusers re-registers the swapped scheduler in the copy's own config
    pipe.scheduler = sched
    pipe.set_progress_bar_config(disable=not progress)
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    noise = torch.randn((len(labels), unet.config.in_channels, *size), generator=gen, dtype=torch.float32)
    noise = noise.to(model.device, model.dtype)
    out = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=gspec.scale,
               guidance=None if model.student else gspec.build(),
               generator=gen, latents=noise, output_type="pt")
    return to_pil_list(out.images), int(out.nfe)


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


def _run_diffusers(model: LoadedModel, sched, steps: int, gspec: GuidanceSpec, conds: list, gen: torch.Generator,
                   progress: bool, negative_prompt: str | None) -> tuple[list, int]:
    """A diffusers pipeline's own loop; guidance objects through :func:`fewstep.guidance.attach`."""
    pipe = model.pipe
    b = len(conds)
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
            from ..guidance.hook import attach

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
    return to_pil_list(out.images), used
