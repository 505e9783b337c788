"""Guidance rules for few-step sampling: CFG, guidance rescale, APG, CFG++, Adaptive Guidance, LinearAG.

Two ways in:

* native: ``fewstep.sample.sample(model, noise, scheduler, steps, guidance=APG(...), cond=c, uncond=u)``
  counts model evaluations exactly (one per branch pass: CFG at 20 steps costs 40);
* diffusers: ``handle = fewstep.guidance.attach(pipe, guidance)`` hooks a classic pipeline's
  UNet/transformer so that its own CFG arithmetic yields the guided result; ``handle.detach()``.

Scale conventions: ``CFG``/``APG``/``AdaptiveGuidance``/``LinearAG`` take ``w`` as diffusers'
``guidance_scale`` and ComfyUI's ``cfg`` (``uncond + w (cond - uncond)``); ``CFGPlusPlus`` takes
CFG++'s ``lambda``. Each class's docstring gives its paper equation and the space it works in.
"""

from .base import Guidance, GuidanceContext, scheduler_alpha_sigma, scheduler_prediction_type, scheduler_sigma_data
from .hook import GuidanceHandle, attach, detach
from .linear_ag import LinearAG, fit_linear_ag
from .methods import (
    APG,
    CFG,
    AdaptiveGuidance,
    CFGPlusPlus,
    GuidanceRescale,
    apg_update,
    cfg_combine,
    cosine_per_sample,
)

__all__ = [
    "APG",
    "AdaptiveGuidance",
    "CFG",
    "CFGPlusPlus",
    "Guidance",
    "GuidanceContext",
    "GuidanceHandle",
    "GuidanceRescale",
    "LinearAG",
    "apg_update",
    "attach",
    "cfg_combine",
    "cosine_per_sample",
    "detach",
    "fit_linear_ag",
    "scheduler_alpha_sigma",
    "scheduler_prediction_type",
    "scheduler_sigma_data",
]
