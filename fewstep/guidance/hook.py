"""``attach(pipe, guidance)``: fewstep guidance inside classic diffusers pipelines.

Classic pipelines (StableDiffusion, StableDiffusionXL, their img2img, StableDiffusion3) hard-code
CFG: they run the denoiser on ``cat([uncond, cond])``, split the output with ``chunk(2)`` and form
``uncond + guidance_scale (cond - uncond)`` (then optionally rescale it). The hook wraps the
denoiser's ``forward`` (UNet or transformer):

1. it splits the doubled batch into the unconditional and conditional halves (every tensor
   argument whose leading dimension is the doubled batch, recursively through dicts and lists:
   ``encoder_hidden_states``, ``added_cond_kwargs``, ``pooled_projections``, timesteps, ...);
2. runs the branches the guidance asks for: both halves in one pass (as the pipeline would), or
   the conditional half plus the unconditional rows still needed (Adaptive Guidance), or the
   conditional half alone;
3. computes the guided prediction ``g`` with the pipeline's scheduler for ``alpha``/``sigma``;
4. returns ``cat([g, g])``: the pipeline's ``uncond + s (cond - uncond)`` is then exactly ``g``
   for any ``guidance_scale`` ``s``, and its ``guidance_rescale`` is a no-op (use
   :class:`~fewstep.guidance.GuidanceRescale` instead; a nonzero ``guidance_rescale`` raises).

The pipeline must run its CFG branch (``guidance_scale > 1``; the value itself is unused: the
guidance object's scale rules). The guidance is reset at the start of every generation (the
scheduler's ``step_index`` is None, or the timestep did not decrease).

CFG++ renoise protocol: the hook also wraps ``pipe.scheduler.step`` so that each step receives
``renoise_eps`` (the unconditional eps of that step); the scheduler must be a fewstep scheduler
with ``supports_renoise`` (``DPMSolverPPScheduler``; ``solver_order=1`` is DDIM), otherwise
``attach`` raises ValueError.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .base import Guidance, GuidanceContext, scheduler_alpha_sigma

_SAMPLE_KEYS = ("sample", "hidden_states")


def _split(obj: Any, n2: int):
    """(uncond part, cond part) of every tensor with leading dim ``n2`` (others shared)."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 1 and obj.shape[0] == n2:
            return obj[: n2 // 2], obj[n2 // 2 :]
        return obj, obj
    if isinstance(obj, dict):
        pairs = {k: _split(v, n2) for k, v in obj.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(obj, (list, tuple)):
        pairs = [_split(v, n2) for v in obj]
        return type(obj)(p[0] for p in pairs), type(obj)(p[1] for p in pairs)
    return obj, obj


def _take(obj: Any, idx: torch.Tensor, n: int):
    """Rows ``idx`` of every tensor with leading dim ``n``."""
    if isinstance(obj, torch.Tensor):
        return obj[idx.to(obj.device)] if obj.ndim >= 1 and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _take(v, idx, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(v, idx, n) for v in obj)
    return obj


def _cat(a: Any, b: Any):
    """Concatenate two split structures along the batch (shared objects stay shared)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a is not b and a.ndim >= 1:
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(_cat(x, y) for x, y in zip(a, b))
    return a


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def _replace_first(out, new):
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    key = next(iter(out.keys()))
    return type(out)(**{**dict(out), key: new})


class GuidanceHandle:
    """What :func:`attach` returns: ``detach()`` restores the pipeline; ``nfe`` counts model
    evaluations of the current/last generation (one per branch pass, as ``fewstep.sample``),
    ``total_nfe`` since attaching; ``reset()`` forces a new generation."""

    def __init__(self, pipe, guidance: Guidance, denoiser_name: str):
        self.pipe = pipe
        self.guidance = guidance
        self.denoiser_name = denoiser_name
        self.denoiser = getattr(pipe, denoiser_name)
        self.nfe = 0
        self.total_nfe = 0
        self._step = 0
        self._last_t = None
        self._pending_renoise = None
        self._attached = False
        self._had_forward = "forward" in vars(self.denoiser)
        self._orig_forward = self.denoiser.forward
        self._scheduler = None
        self._had_step = False
        self._orig_step = None

    # ---- install / remove ------------------------------------------------------------------------
    def _install(self):
        handle = self
        orig = self._orig_forward

        @functools.wraps(orig)
        def forward(*args, **kwargs):
            return handle._forward(orig, args, kwargs)

        self.denoiser.forward = forward
        if self.guidance.needs_renoise:
            sched = self.pipe.scheduler
            self._scheduler = sched
            self._had_step = "step" in vars(sched)
            orig_step = sched.step
            self._orig_step = orig_step

            @functools.wraps(orig_step)
            def step(*args, **kwargs):
                ren = handle._pending_renoise
                handle._pending_renoise = None
                if ren is not None and kwargs.get("renoise_eps") is None:
                    kwargs["renoise_eps"] = ren
                return orig_step(*args, **kwargs)

            sched.step = step
        self._attached = True

    def detach(self) -> None:
        """Restore the denoiser's ``forward`` (and the scheduler's ``step``) exactly."""
        if not self._attached:
            return
        if self._had_forward:
            self.denoiser.forward = self._orig_forward
        else:
            del self.denoiser.forward
        if self._scheduler is not None:
            if self._had_step:
                self._scheduler.step = self._orig_step
            else:
                del self._scheduler.step
        self._attached = False
        if getattr(self.pipe, "_fewstep_guidance", None) is self:
            del self.pipe._fewstep_guidance

    def reset(self) -> None:
        """Start a new generation: reset the guidance and the per-generation counter."""
        self.guidance.reset()
        self.nfe = 0
        self._step = 0
        self._last_t = None
        self._pending_renoise = None

    # ---- the hook --------------------------------------------------------------------------------
    def _new_generation(self, t) -> bool:
        sched = self.pipe.scheduler
        tv = float(torch.as_tensor(t).reshape(-1)[0])
        si = getattr(sched, "step_index", "absent")
        if self._last_t is None:
            return True
        if si is None:
            return True
        return tv >= self._last_t

    def _forward(self, orig, args, kwargs):
        args = list(args)
        if args:
            x = args[0]
        else:
            key = next((k for k in _SAMPLE_KEYS if k in kwargs), None)
            if key is None:
                raise ValueError("fewstep.guidance hook: cannot find the denoiser's sample argument")
            x = kwargs[key]
        t = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("t"))
        do_cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if not do_cfg:
            raise ValueError("fewstep.guidance.attach needs the pipeline's CFG branch: call it with "
                             "guidance_scale > 1 (the value is unused; the guidance object's scale applies)")
        if float(getattr(self.pipe, "_guidance_rescale", 0.0) or 0.0) > 0:
            raise ValueError("guidance_rescale: with fewstep.guidance attached, wrap the guidance in "
                             "GuidanceRescale(phi, guidance) instead of passing guidance_rescale to the pipeline")
        n2 = x.shape[0]
        if n2 % 2:
            raise ValueError(f"expected a doubled CFG batch, got batch {n2}")
        b = n2 // 2
        if self._new_generation(t):
            self.reset()
        tv = float(torch.as_tensor(t).reshape(-1)[0])
        self._last_t = tv
        sched = self.pipe.scheduler
        a, s = scheduler_alpha_sigma(sched, t, None)
        x_c = x[b:]
        ctx = GuidanceContext.from_model_input(x_c, t, sched, self._step, len(getattr(sched, "timesteps", [])) or None,
                                               alpha_sigma=(a, s))
        g = self.guidance
        mask = g.needs_uncond(ctx).to(torch.bool).reshape(-1)
        if mask.numel() != b:
            raise ValueError(f"needs_uncond returned {mask.numel()} flags for a batch of {b}")
        if bool(mask.all()):
            out = orig(*args, **kwargs)
            pred = _first(out)
            out_u, out_c = pred[:b], pred[b:]
            used, frac = 2, 2.0
        else:
            a_u, a_c = _split(args, n2)
            k_u, k_c = _split(kwargs, n2)
            if bool(mask.any()):
                idx = mask.nonzero().reshape(-1)
                a_u, k_u = _take(a_u, idx, b), _take(k_u, idx, b)
                call_a, call_k = _cat(a_u, a_c), _cat(k_u, k_c)
                out = orig(*call_a, **call_k)
                pred = _first(out)
                m = len(idx)
                out_u, out_c = pred[:m], pred[m:]
                used, frac = 2, 1.0 + m / b
            else:
                out = orig(*a_c, **k_c)
                out_c, out_u = _first(out), None
                used, frac = 1, 1.0
        g.nfe += used
        g.sample_evals += frac
        g.uncond_skipped += int((~mask).sum())
        self.nfe += used
        self.total_nfe += used
        guided = g.guide_masked(out_c, out_u, mask, ctx)
        if g.needs_renoise:
            self._pending_renoise = g.renoise(out_c, out_u, ctx)
        self._step += 1
        return _replace_first(out, torch.cat([guided, guided]))


def attach(pipe, guidance: Guidance) -> GuidanceHandle:
    """Install ``guidance`` on a classic diffusers pipeline (see the module docstring).

    Supported: StableDiffusion(Img2Img)Pipeline, StableDiffusionXL(Img2Img)Pipeline,
    StableDiffusion3Pipeline and any pipeline with the same ``[uncond, cond]`` batching and a
    ``unet`` or ``transformer``; batch > 1, negative prompts and ``num_images_per_prompt`` work
    (they only change the batch). Call the pipeline with ``guidance_scale > 1`` (value unused) and
    without ``guidance_rescale``.

    Scale conventions are the guidance object's (``CFG(w)``: ``w`` = diffusers ``guidance_scale``).

    Returns a :class:`GuidanceHandle`; ``handle.detach()`` (or :func:`detach`) restores the
    pipeline exactly, ``handle.nfe`` is the number of model evaluations of the last generation.
    Raises ValueError for a pipeline without a denoiser, a second attach, or CFG++ with a
    scheduler that cannot renoise (swap in ``DPMSolverPPScheduler.from_config(pipe.scheduler.config)``).
    """
    if not isinstance(guidance, Guidance):
        raise ValueError(f"guidance must be a fewstep.guidance.Guidance, got {type(guidance).__name__}")
    name = next((n for n in ("unet", "transformer") if getattr(pipe, n, None) is not None), None)
    if name is None:
        raise ValueError("pipe has neither a `unet` nor a `transformer` to hook")
    if getattr(pipe, "_fewstep_guidance", None) is not None:
        raise ValueError("pipe already has a fewstep guidance attached; detach() it first")
    if guidance.needs_renoise:
        guidance.check_scheduler(getattr(pipe, "scheduler", None))
    handle = GuidanceHandle(pipe, guidance, name)
    handle._install()
    pipe._fewstep_guidance = handle
    return handle


def detach(pipe) -> None:
    """Remove the guidance :func:`attach` installed on ``pipe`` (no-op when none)."""
    handle = getattr(pipe, "_fewstep_guidance", None)
    if handle is not None:
        handle.detach()
