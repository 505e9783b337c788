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
import math
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
        guidance: ``None`` (conditional model only), a finite number ``w`` (shorthand for
            :class:`fewstep.guidance.CFG` ``(w)``: ``uncond + w (cond - uncond)``, diffusers'
            ``guidance_scale`` convention; ``w = 1`` skips the unconditional pass), a spec string
            as ``fewstep sample --guidance`` takes (``"cfg:2"``, ``"apg:scale=3,eta=0"``, see
            :func:`fewstep.guidance.spec.parse_guidance`), or a :class:`fewstep.guidance.Guidance`
            object. Both branches of a step run in one batched
            call when the model offers ``evaluate_pair`` (see :meth:`fewstep.guidance.Guidance.predict`).
        cond, uncond: conditions of the two branches.
        generator: RNG passed to ``scheduler.step`` (SDE solvers).
        callback: ``callback(i, t, x)`` after each step.
        progress: show a tqdm progress bar.
        step_kwargs: extra keyword arguments for every ``scheduler.step`` call (e.g. DDIM's ``eta``).

    Returns:
        ``(x, nfe)``: the final sample and the number of model evaluations, where one evaluation
        is one network pass of one branch over the batch (CFG at 20 steps costs 40).

    Raises:
        ValueError: non-finite values in ``noise`` (the input's fault, reported before the model
            runs), a non-finite guidance scale, a bad guidance spec string.
        FloatingPointError: NaN/inf in the (guided) model output or in the sample after a step,
            naming which, the step and the timestep; checked here for every scheduler, whatever
            the scheduler's own ``check_finite`` says.
    """
    import torch
    from tqdm.auto import tqdm

    if not isinstance(noise, torch.Tensor):
        raise TypeError("noise must be a torch.Tensor")
    bad = _count_non_finite(noise)
    if bad:
        raise ValueError(f"noise (the starting sample) contains {bad} NaN/inf value(s) of {noise.numel()}; "
                         "the input is broken, not the model: draw it again (e.g. torch.randn)")
    guide = _guidance_object(guidance)
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
        _check_finite(out, "model output" + (" (after guidance)" if guide is not None else ""), i, t)
        step_extra = extra if renoise is None else {**extra, "renoise_eps": renoise}
        x = scheduler.step(out, t, x, return_dict=False, **step_extra)[0]
        _check_finite(x, f"sample returned by {type(scheduler).__name__}.step", i, t)
        if callback is not None:
            callback(i, t, x)
    return x, nfe


def _guidance_object(guidance):
    """``guidance`` as accepted by :func:`sample` -> ``None`` or an object with ``predict``."""
    from .guidance.methods import CFG

    if guidance is None or hasattr(guidance, "predict"):
        return guidance
    if isinstance(guidance, str):
        from .guidance.spec import parse_guidance

        return parse_guidance(guidance, name="guidance").build()
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"guidance must be None, a number, a spec string such as 'cfg:2' or a Guidance object, "
                        f"got {guidance!r}")
    if not math.isfinite(float(guidance)):
        raise ValueError(f"guidance scale must be a finite number, got {guidance!r}")
    return CFG(float(guidance))


def _count_non_finite(x: torch.Tensor) -> int:
    import torch

    if not (x.is_floating_point() or x.is_complex()):
        return 0
    return int((~torch.isfinite(x)).sum())


def _check_finite(x, what: str, i: int, t) -> None:
    """``FloatingPointError`` naming ``what``, the step and the timestep when ``x`` has NaN/inf."""
    import torch

    if not isinstance(x, torch.Tensor) or bool(torch.isfinite(x).all()):  # one reduction on the fast path
        return
    bad = _count_non_finite(x)
    if bad:
        nan = int(torch.isnan(x).sum())
        raise FloatingPointError(f"{what} at step {i} (timestep {float(t):g}) has {bad} non-finite value(s) of "
                                 f"{x.numel()} ({nan} NaN, {bad - nan} inf)")
