"""``fewstep.sample``: the sampling loop a diffusers pipeline runs, over a plain callable.

The model follows fewstep's call convention ``model(x, t, c) -> raw output`` (of the scheduler's
``prediction_type``), with ``c`` any condition object and ``uncond`` the condition of the
unconditional branch (a null label, empty-prompt embeddings, ...). ``fewstep.models.denoiser(unet,
null_class=...)`` adapts a diffusers UNet to it. This is fewstep's one sampling loop: the digits
pipeline and ``fewstep sample`` run through it.

torch and tqdm are imported when :func:`sample` runs, not with the module: ``import fewstep``
(and so the ``fewstep`` command line) must stay fast.
"""

from __future__ import annotations

import inspect
import numbers
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


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
    step_kwargs: dict[str, Any] | None = None,
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
        guidance: ``None`` (conditional model only), a number ``w`` (shorthand for
            :class:`fewstep.guidance.CFG` ``(w)``: ``uncond + w (cond - uncond)``, diffusers'
            ``guidance_scale`` convention; ``w = 1`` skips the unconditional pass), or a
            :class:`fewstep.guidance.Guidance` object. Both branches of a step run in one batched
            call when the model offers ``evaluate_pair`` (see :meth:`fewstep.guidance.Guidance.predict`).
        cond, uncond: conditions of the two branches.
        generator: RNG passed to ``scheduler.step`` (SDE solvers).
        callback: ``callback(i, t, x)`` after each step.
        progress: show a tqdm progress bar.
        step_kwargs: extra keyword arguments for every ``scheduler.step`` call (e.g. DDIM's ``eta``).

    Returns:
        ``(x, nfe)``: the final sample and the number of model evaluations, where one evaluation
        is one network pass of one branch over the batch (CFG at 20 steps costs 40).
    """
    import torch
    from tqdm.auto import tqdm

    from .guidance.methods import CFG

    if not isinstance(noise, torch.Tensor):
        raise TypeError("noise must be a torch.Tensor")
    if isinstance(guidance, bool) or not (guidance is None or isinstance(guidance, numbers.Real)
                                          or hasattr(guidance, "predict")):
        raise TypeError(f"guidance must be None, a number or a Guidance object, got {guidance!r}")
    guide = CFG(float(guidance)) if isinstance(guidance, numbers.Real) else guidance
    kwargs = {}
    if timesteps is not None:
        kwargs["timesteps"] = timesteps
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    scheduler.set_timesteps(num_inference_steps, device=noise.device, **kwargs)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch schedulers have none
    extra = dict(step_kwargs or {})
    if _accepts(scheduler.step, "generator"):
        extra["generator"] = generator
    if guide is not None:
        guide.reset()
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
        else:
            out = model(x_in, t, cond)
            nfe += 1
        step_extra = extra if renoise is None else {**extra, "renoise_eps": renoise}
        x = scheduler.step(out, t, x, return_dict=False, **step_extra)[0]
        if callback is not None:
            callback(i, t, x)
    return x, nfe
