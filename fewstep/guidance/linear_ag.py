"""LinearAG: unconditional evaluations replaced by a linear combination of past estimates.

Castillo et al. (AAAI 2025, arXiv 2312.12487, Sec. 5 "LinearAG") observe that guided trajectories
are regular enough for the unconditional estimate to be predicted from estimates already at
hand. fewstep's estimator, for every step ``i >= start_step`` (in ``space``, default x0)::

    u_hat_i = a_i c_i + b_i c_{i-1} + d_i u_{i-1}

with ``c`` the conditional predictions, ``u_{i-1}`` the previous unconditional estimate (a real
evaluation at ``start_step - 1``, an estimate afterwards) and per-step scalars ``(a_i, b_i, d_i)``
fitted offline by least squares (:func:`fit_linear_ag`) on trajectories recorded with full CFG at
the same model, scheduler, step count and scale. The fit is "closed loop": step ``i``'s
``u_{i-1}`` feature is the estimate of the previous fitted step, as at inference. The coefficients
are not constrained to sum to 1 (a linear, not affine, combination; the paper's wording is
"affine transformations of past score estimates").

``fewstep fit-linear-ag`` fits them for the bundled digits teacher and writes
``configs/linear_ag_digits.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from .._io import read_json
from .base import Guidance, GuidanceContext, check_number, check_space
from .methods import CFG, _as_guidance, _WrappedGuidance

FEATURES = ("cond", "cond_prev", "uncond_prev")


class LinearAG(_WrappedGuidance):
    """LinearAG (Castillo et al. 2025, Sec. 5): from ``start_step`` on, the unconditional branch
    is not evaluated; its estimate ``u_hat_i = a_i c_i + b_i c_{i-1} + d_i u_{i-1}`` (in
    ``space``, see the module docstring) feeds the inner guidance instead. Costs 1 evaluation
    per step after ``start_step`` (2 before), so ``start_step = N/2`` saves 25% of CFG's.

    Scale: the inner rule's (``CFG(w)``: diffusers ``guidance_scale`` = ComfyUI ``cfg`` = ``w``);
    the coefficients are fitted for one ``w`` and step count and a mismatch raises ValueError.

    Args:
        coefficients: a dict as written by :func:`fit_linear_ag` (keys ``num_steps``,
            ``start_step``, ``space``, ``scale``, ``coefficients`` = list of ``[a, b, d]`` per step
            from ``start_step``), or a path to its JSON file.
        guidance: the inner rule; default ``CFG(coefficients["scale"])``. Any rule without
            renoising (APG composes).
    """

    def __init__(self, coefficients: dict | str | Path, guidance: Guidance | None = None):
        if isinstance(coefficients, (str, Path)):
            path = Path(coefficients)
            if not path.exists():
                raise ValueError(f"coefficients file {str(path)!r} does not exist")
            coefficients = read_json(path, "LinearAG coefficients file")
        if not isinstance(coefficients, dict):
            raise ValueError("coefficients must be a dict or a JSON path")
        for key in ("num_steps", "start_step", "space", "scale", "coefficients"):
            if key not in coefficients:
                raise ValueError(f"coefficients is missing the key {key!r}")
        self.table = coefficients
        self.num_steps = int(coefficients["num_steps"])
        self.start_step = int(coefficients["start_step"])
        self.space = check_space(coefficients["space"])
        coefs = coefficients["coefficients"]
        if not 1 <= self.start_step <= self.num_steps or len(coefs) != self.num_steps - self.start_step:
            raise ValueError("coefficients: need 1 <= start_step <= num_steps and one [a, b, d] per step "
                             "from start_step")
        self.coefs = [[float(v) for v in row] for row in coefs]
        if any(len(r) != 3 or not all(math.isfinite(v) for v in r) for r in self.coefs):
            raise ValueError("coefficients: every row must hold 3 finite numbers")
        inner = guidance if guidance is not None else CFG(float(coefficients["scale"]))
        super().__init__(_as_guidance(inner, None), allow_renoise=False)
        self._hist = None

    def reset(self):
        super().reset()
        self._hist = None  # (cond_prev, uncond_prev) in self.space

    def _check(self, ctx: GuidanceContext) -> None:
        if ctx.num_steps is not None and ctx.num_steps != self.num_steps:
            raise ValueError(f"LinearAG coefficients were fitted for {self.num_steps} steps, "
                             f"sampling uses {ctx.num_steps}")

    def needs_uncond(self, ctx):
        self._check(ctx)
        need = ctx.step_index < self.start_step or self._hist is None
        return torch.full((ctx.x.shape[0],), bool(need), dtype=torch.bool, device=ctx.x.device)

    def estimate(self, cond_s: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor:
        """``u_hat_i`` in ``space`` from the current conditional (in ``space``) and the history."""
        a, b, d = self.coefs[ctx.step_index - self.start_step]
        c_prev, u_prev = self._hist
        return a * cond_s + b * c_prev.to(cond_s.dtype) + d * u_prev.to(cond_s.dtype)

    def guide_masked(self, cond, uncond, mask, ctx):
        c_s = ctx.to_space(cond, self.space)
        if uncond is None:
            u_s = self.estimate(c_s, ctx)
            uncond = ctx.from_space(u_s, self.space)
            mask = torch.ones_like(mask)
        elif not bool(mask.all()):
            raise ValueError("LinearAG decides for the whole batch")
        else:
            u_s = ctx.to_space(uncond, self.space)
        self._hist = (c_s, u_s)
        return self.inner.guide_masked(cond, uncond, mask, ctx)

    def guide(self, cond, uncond, ctx):
        return self.guide_masked(cond, uncond, torch.ones(cond.shape[0], dtype=torch.bool), ctx)

    def _repr_args(self):
        return {"guidance": self.inner, "start_step": self.start_step, "num_steps": self.num_steps,
                "space": self.space}


class _Recorder(Guidance):
    """CFG that records each step's conditional and unconditional predictions in ``space``."""

    def __init__(self, inner: Guidance, space: str):
        super().__init__()
        self.inner, self.space = inner, space
        self.cond: list[torch.Tensor] = []
        self.uncond: list[torch.Tensor] = []

    def reset(self):
        super().reset()
        self.inner.reset()

    def guide(self, cond, uncond, ctx):
        self.cond.append(ctx.to_space(cond, self.space).double().cpu())
        self.uncond.append(ctx.to_space(uncond, self.space).double().cpu())
        return self.inner.guide(cond, uncond, ctx)


def fit_linear_ag(model: Callable, scheduler, noise: torch.Tensor, cond: Any, uncond: Any, num_steps: int,
                  scale: float, start_step: int | None = None, space: str = "x0",
                  guidance: Guidance | None = None, ridge: float = 1e-10) -> dict:
    """Fit LinearAG coefficients by least squares on CFG trajectories (Castillo et al. 2025, Sec. 5).

    Samples ``noise`` with ``fewstep.sample`` and full guidance (``CFG(scale)`` or ``guidance``),
    records every step's conditional and unconditional predictions in ``space``, then for each
    step ``i >= start_step`` solves ``min ||u_i - (a c_i + b c_{i-1} + d u_hat_{i-1})||^2`` over
    all samples and pixels (a 3x3 normal system with a tiny ``ridge``), where ``u_hat_{i-1}`` is
    the previous step's estimate (the real ``u`` at ``start_step - 1``).

    Returns the JSON-ready dict :class:`LinearAG` takes, with the per-step relative residual
    ``rel_error = ||u - u_hat|| / ||u||`` (closed loop) for inspection.
    """
    from ..sample import sample as _sample

    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    start_step = num_steps // 2 if start_step is None else start_step
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 1 <= start_step <= num_steps:
        raise ValueError(f"start_step must be an int in [1, num_steps], got {start_step!r}")
    check_space(space)
    scale = check_number("scale", scale)
    inner = guidance if guidance is not None else CFG(scale)
    rec = _Recorder(inner, space)
    _sample(model, noise, scheduler, num_steps, guidance=rec, cond=cond, uncond=uncond)
    if len(rec.cond) != num_steps:
        raise ValueError(f"the scheduler made {len(rec.cond)} steps, expected {num_steps}")
    coefs, errs = [], []
    u_prev = rec.uncond[start_step - 1]
    for i in range(start_step, num_steps):
        feats = torch.stack([rec.cond[i].reshape(-1), rec.cond[i - 1].reshape(-1), u_prev.reshape(-1)], dim=1)
        target = rec.uncond[i].reshape(-1)
        gram = feats.T @ feats
        gram = gram + ridge * torch.trace(gram) / 3 * torch.eye(3, dtype=gram.dtype)
        sol = torch.linalg.solve(gram, feats.T @ target)
        est = (feats @ sol).reshape(rec.uncond[i].shape)
        coefs.append([float(v) for v in sol])
        errs.append(float((est - rec.uncond[i]).norm() / rec.uncond[i].norm().clamp_min(1e-30)))
        u_prev = est
    return {
        "method": "LinearAG (Castillo et al. 2025), fitted by fewstep.guidance.fit_linear_ag",
        "features": list(FEATURES),
        "num_steps": num_steps,
        "start_step": start_step,
        "space": space,
        "scale": scale,
        "scheduler": type(scheduler).__name__,
        "num_samples": int(noise.shape[0]),
        "coefficients": coefs,
        "rel_error": errs,
    }
