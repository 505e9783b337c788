"""``fewstep.sample``: the sampling loop a diffusers pipeline runs, over a plain callable.

The model follows fewstep's call convention ``model(x, t, c) -> raw output`` (of the scheduler's
``prediction_type``), with ``c`` any condition object and ``uncond`` the condition of the
unconditional branch (a null label, empty-prompt embeddings, ...).
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable

import torch
from tqdm.auto import tqdm


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def sample(
    model: Callable[[torch.Tensor, Any, Any], torch.Tensor],
    noise: torch.Tensor,
    scheduler,
    num_inference_steps: int | None = None,
    guidance=None,
    cond: Any = None,
    uncond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Any, torch.Tensor], None] | None = None,
    timesteps=None,
    sigmas=None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Sample from ``model`` with ``scheduler``, starting from ``noise``; returns ``(x0, nfe)``.

    Runs exactly what a diffusers pipeline runs: ``set_timesteps``, ``x = noise *
    init_noise_sigma``, then per timestep ``scale_model_input``, the model, guidance and
    ``scheduler.step``. Works with fewstep and diffusers schedulers.

    Args:
        model: ``model(x, t, c) -> raw output``; ``t`` is the scheduler's timestep (training scale).
        noise: starting Gaussian noise (B, ...).
        scheduler: any diffusers-style scheduler.
        num_inference_steps: number of steps (or give ``timesteps``/``sigmas``).
        guidance: ``None`` (conditional model only), a number ``w`` (classifier-free guidance
            ``uncond + w (cond - uncond)``, diffusers' ``guidance_scale`` convention; ``w = 1`` skips
            the unconditional pass), or a :class:`fewstep.guidance.Guidance` object.
        cond, uncond: conditions of the two branches.
        generator: RNG passed to ``scheduler.step`` (SDE solvers).
        callback: ``callback(i, t, x)`` after each step.
        progress: show a tqdm progress bar.

    Returns:
        ``(x, nfe)``: the final sample and the number of model evaluations, where one evaluation
        is one network pass of one branch over the batch (CFG at 20 steps costs 40).
    """
    if not isinstance(noise, torch.Tensor):
        raise TypeError("noise must be a torch.Tensor")
    kwargs = {}
    if timesteps is not None:
        kwargs["timesteps"] = timesteps
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    scheduler.set_timesteps(num_inference_steps, device=noise.device, **kwargs)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch schedulers have none
    step_kwargs = {"generator": generator} if _accepts(scheduler.step, "generator") else {}
    guide = None
    if guidance is not None and not isinstance(guidance, numbers.Number):
        guide = guidance
        guide.reset()
    elif isinstance(guidance, bool):
        raise TypeError("guidance must be None, a number or a Guidance object")
    nfe = 0
    ts = scheduler.timesteps
    scale_input = getattr(scheduler, "scale_model_input", None)  # absent on FlowMatch schedulers
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="sampling")):
        x_in = scale_input(x, t) if scale_input is not None else x
        renoise = None
        if guide is not None:
            out, renoise, used = guide.predict(model, x_in, t, cond, uncond, scheduler=scheduler, step_index=i,
                                               num_steps=len(ts))
            nfe += used
        elif guidance is None or float(guidance) == 1.0:
            out = model(x_in, t, cond)
            nfe += 1
        else:
            out_c = model(x_in, t, cond)
            out_u = model(x_in, t, uncond)
            out = out_u + float(guidance) * (out_c - out_u)
            nfe += 2
        extra = dict(step_kwargs)
        if renoise is not None:
            extra["renoise_eps"] = renoise
        x = scheduler.step(out, t, x, return_dict=False, **extra)[0]
        if callback is not None:
            callback(i, t, x)
    return x, nfe
