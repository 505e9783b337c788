"""Guidance rules for few-step sampling: CFG, guidance rescale, APG, CFG++, Adaptive Guidance, LinearAG.

Two ways in:

* native: ``fewstep.sample.sample(model, noise, scheduler, steps, guidance=APG(...), cond=c, uncond=u)``
  counts model evaluations exactly (one per branch pass: CFG at 20 steps costs 40);
* diffusers: ``handle = fewstep.guidance.attach(pipe, guidance)`` hooks a classic pipeline's
  UNet/transformer so that its own CFG arithmetic yields the guided result; ``handle.detach()``.

By text: ``parse_guidance("apg:scale=3,eta=0").build()`` (:mod:`fewstep.guidance.spec`, the
language of ``fewstep sample --guidance``).

Scale conventions: ``CFG``/``APG``/``AdaptiveGuidance``/``LinearAG`` take ``w`` as diffusers'
``guidance_scale`` and ComfyUI's ``cfg`` (``uncond + w (cond - uncond)``); ``CFGPlusPlus`` takes
CFG++'s ``lambda``. Each class's docstring gives its paper equation and the space it works in.

The names load on first use (``fewstep.guidance.spec`` needs no torch, for the CLI's start-up).
"""

from __future__ import annotations

from .._imports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("Guidance", "GuidanceContext", "scheduler_alpha_sigma", "scheduler_prediction_type",
                     "scheduler_sigma_data"), ".base"),
    **dict.fromkeys(("GuidanceHandle", "attach", "detach"), ".hook"),
    **dict.fromkeys(("LinearAG", "fit_linear_ag"), ".linear_ag"),
    **dict.fromkeys(("APG", "CFG", "AdaptiveGuidance", "CFGPlusPlus", "GuidanceRescale", "apg_update",
                     "cfg_combine", "cosine_per_sample"), ".methods"),
    **dict.fromkeys(("GuidanceSpec", "parse_guidance"), ".spec"),
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
