"""The ``Guidance`` protocol: per-step context, prediction spaces, condition slicing, evaluation counting.

A guidance object turns the conditional and unconditional raw model outputs of one step into the
guided raw output (of the scheduler's ``prediction_type``) that the scheduler steps with. The
same object serves both entry points:

* ``fewstep.sample(..., guidance=g, cond=c, uncond=u)`` calls :meth:`Guidance.predict`, which
  evaluates the branches the guidance asks for and returns ``(out, renoise_eps, used)``;
* ``fewstep.guidance.attach(pipe, g)`` calls the same :meth:`Guidance.needs_uncond` /
  :meth:`Guidance.guide` pair from a hook on the pipeline's denoiser.

Spaces. ``"output"`` is the raw model output (eps, v or flow velocity, as the model predicts),
``"eps"`` the noise prediction, ``"x0"`` the data prediction (Tweedie's denoised estimate). All
conversions go through :func:`fewstep.schedule.to_x0_eps` / :func:`fewstep.schedule.from_x0_eps`
at the step's ``(alpha, sigma)`` and model input ``x`` (the VP state the model sees), so a guided
``x0`` is always handed back as the raw output whose ``(x0, eps)`` satisfy ``x = alpha x0 + sigma eps``.
Linear rules (CFG) give the same result in every space; nonlinear ones (APG, rescale, the AG
cosine) do not, which is why each class states its space.

Counting. One model evaluation is one network pass of one branch (conditional or unconditional)
over the batch, batched together with the other branch or not: CFG at 20 steps costs 40, a
conditional-only step 1. A pass over a sub-batch (per-sample Adaptive Guidance) still counts 1;
:attr:`Guidance.sample_evals` additionally counts per-sample branch evaluations divided by the
batch size, the finer cost measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..schedule import (
    FLOW_SCHEDULER_CLASSES,
    PREDICTION_TYPES,
    edm_preconditioning,
    from_x0_eps,
    noise_schedule_of,
    to_x0_eps,
)

SPACES = ("x0", "eps", "v", "output")


def check_space(space: str, allowed=SPACES) -> str:
    """Validate a ``space`` argument; raises ValueError naming it."""
    if space not in allowed:
        raise ValueError(f"space={space!r} is not supported; allowed: {', '.join(map(repr, allowed))}")
    return space


def check_number(name: str, value, low: float | None = None, high: float | None = None, low_open=False) -> float:
    """Validate a real-valued argument (finite, in range); raises ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


# ------------------------------------------------------------------------------------------------
# scheduler introspection
# ------------------------------------------------------------------------------------------------
def scheduler_prediction_type(scheduler) -> str:
    """The raw-output type a scheduler expects (``flow_prediction`` for diffusers FlowMatch ones)."""
    if scheduler is None:
        return "epsilon"
    cfg = getattr(scheduler, "config", {})
    pt = cfg.get("prediction_type") if hasattr(cfg, "get") else None
    if pt is None:
        name = type(scheduler).__name__
        pt = "flow_prediction" if name in FLOW_SCHEDULER_CLASSES or name.startswith("FlowMatch") else "epsilon"
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type={pt!r} is not supported by fewstep guidance")
    return pt


def scheduler_sigma_data(scheduler) -> float | None:
    """``sigma_data`` when the scheduler expects an EDM-preconditioned network (Karras et al. 2022,
    Eq. 7: raw output ``F``, input ``c_in x``): fewstep schedulers on an EDM schedule and diffusers'
    ``EDM*`` schedulers; None for VP and flow schedulers. diffusers' Cosine DPM-Solver (another
    ``c_noise``) is a ``ValueError``. Read through :func:`fewstep.schedule.noise_schedule_of`."""
    if scheduler is None:
        return None
    return noise_schedule_of(scheduler).sigma_data


def scheduler_alpha_sigma(scheduler, t, step_index: int | None = None) -> tuple[float, float]:
    """``(alpha, sigma)`` of the state the model sees at this step.

    fewstep schedulers report their grid point (``alpha_sigma``); any other diffusers scheduler is
    read through its schedule (:func:`fewstep.schedule.noise_schedule_of`) at the model time ``t``
    (diffusers' Euler-type schedulers feed the model ``scale_model_input(x)``, which is exactly this
    VP state).
    """
    if scheduler is None:
        raise ValueError("scheduler is required for guidance outside the raw-output space")
    if hasattr(scheduler, "alpha_sigma"):
        return scheduler.alpha_sigma(step_index)
    sched = noise_schedule_of(scheduler)
    tt = float(sched.t_of_model_time(float(torch.as_tensor(t).reshape(-1)[0])))  # EDM: t is c_noise
    return float(sched.alpha(tt)), float(sched.sigma(tt))


# ------------------------------------------------------------------------------------------------
# per-step context
# ------------------------------------------------------------------------------------------------
@dataclass
class GuidanceContext:
    """What a guidance rule may look at during one step.

    ``x``: the state ``alpha x0 + sigma eps`` (the model input, except on EDM schedulers where
    the network sees ``c_in x``: build contexts with :meth:`from_model_input`); ``t``: the model
    time; ``alpha``/``sigma``: its noise level; ``prediction_type``: the raw-output type;
    ``step_index``/``num_steps``: position in the generation (``num_steps`` may be None in the
    pipeline hook when unknown); ``scheduler``: the scheduler, or None; ``sigma_data``: set for
    EDM-preconditioned networks, whose raw output is ``F`` (Karras et al. 2022, Eq. 7).
    """

    x: torch.Tensor
    t: Any
    alpha: float
    sigma: float
    prediction_type: str = "epsilon"
    step_index: int = 0
    num_steps: int | None = None
    scheduler: Any = None
    rows: torch.Tensor | None = None
    sigma_data: float | None = None

    @classmethod
    def from_model_input(cls, x_in: torch.Tensor, t, scheduler, step_index: int = 0, num_steps: int | None = None,
                         alpha_sigma: tuple[float, float] | None = None) -> "GuidanceContext":
        """The context of one step from what the network is called with: reads ``alpha, sigma``,
        the prediction type and EDM's ``sigma_data`` from ``scheduler`` and, on EDM schedulers,
        undoes the input scaling ``c_in = 1 / sqrt((sigma/alpha)^2 + sigma_data^2)`` (Table 1) so
        ``x`` is the state the conversions expect."""
        a, s = alpha_sigma if alpha_sigma is not None else (
            scheduler_alpha_sigma(scheduler, t, step_index) if scheduler is not None else (1.0, 0.0))
        sd = scheduler_sigma_data(scheduler)
        x = x_in
        if sd is not None:
            x = x_in / float(edm_preconditioning(s / a, sd)[2])
        return cls(x, t, a, s, scheduler_prediction_type(scheduler), step_index, num_steps, scheduler,
                   sigma_data=sd)

    def subset(self, mask: torch.Tensor) -> "GuidanceContext":
        """The context restricted to the samples where ``mask`` is true; ``rows`` keeps their
        indices in the full batch (for per-sample state such as APG momentum)."""
        idx = mask.nonzero().reshape(-1)
        rows = idx if self.rows is None else self.rows[idx]
        return GuidanceContext(self.x[mask], self.t, self.alpha, self.sigma, self.prediction_type,
                               self.step_index, self.num_steps, self.scheduler, rows, self.sigma_data)

    def x0_eps(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` of a raw output at this step (float64 when ``out`` is float64)."""
        return to_x0_eps(out, self.x.to(out.dtype), self.alpha, self.sigma, self.prediction_type,
                         sigma_data=self.sigma_data)

    def to_space(self, out: torch.Tensor, space: str) -> torch.Tensor:
        """A raw output expressed in ``space`` (``output`` returns it unchanged)."""
        if space == "output":
            return out
        x0, eps = self.x0_eps(out)
        if space == "v":
            return from_x0_eps(x0, eps, self.alpha, self.sigma, "v_prediction")
        return x0 if space == "x0" else eps

    def from_space(self, value: torch.Tensor, space: str, x: torch.Tensor | None = None) -> torch.Tensor:
        """The raw output whose representation in ``space`` is ``value`` (inverse of :meth:`to_space`).

        ``x0``: ``eps = (x - alpha x0) / sigma``; ``eps``: ``x0 = (x - sigma eps) / alpha``;
        ``v``: Salimans & Ho's ``v = alpha eps - sigma x0``.
        """
        if space == "output":
            return value
        x = (self.x if x is None else x).to(value.dtype)
        if space == "v":
            x0, eps = to_x0_eps(value, x, self.alpha, self.sigma, "v_prediction")
            return from_x0_eps(x0, eps, self.alpha, self.sigma, self.prediction_type, sigma_data=self.sigma_data)
        if space == "x0":
            if self.sigma <= 0:
                raise ValueError("cannot express an x0-space guidance at sigma = 0")
            eps = (x - self.alpha * value) / self.sigma
            return from_x0_eps(value, eps, self.alpha, self.sigma, self.prediction_type,
                               sigma_data=self.sigma_data)
        if self.alpha <= 0:
            raise ValueError("cannot express an eps-space guidance at alpha = 0")
        x0 = (x - self.sigma * value) / self.alpha
        return from_x0_eps(x0, value, self.alpha, self.sigma, self.prediction_type, sigma_data=self.sigma_data)


# ------------------------------------------------------------------------------------------------
# condition slicing (per-sample branch skipping)
# ------------------------------------------------------------------------------------------------
class _Unsliceable(Exception):
    pass


def slice_condition(c: Any, index: torch.Tensor, batch: int) -> Any:
    """The condition of the samples in ``index`` (a LongTensor): tensors with a leading batch
    dimension are indexed, dicts/lists/tuples recursively, scalars, 0-d tensors, size-1 leading
    dims and None are shared. Raises ``_Unsliceable`` for anything else."""
    if c is None or isinstance(c, (int, float, str)):
        return c
    if isinstance(c, torch.Tensor):
        if c.ndim == 0 or c.shape[0] == 1:
            return c
        if c.shape[0] == batch:
            return c[index.to(c.device)]
        raise _Unsliceable(f"tensor with leading dim {c.shape[0]} for batch {batch}")
    if isinstance(c, dict):
        return {k: slice_condition(v, index, batch) for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        return type(c)(slice_condition(v, index, batch) for v in c)
    raise _Unsliceable(type(c).__name__)


def can_slice(c: Any, batch: int) -> bool:
    """Whether :func:`slice_condition` can take a sub-batch of ``c``."""
    try:
        slice_condition(c, torch.zeros(1, dtype=torch.long), batch)
        return True
    except _Unsliceable:
        return False


# ------------------------------------------------------------------------------------------------
# the base class
# ------------------------------------------------------------------------------------------------
class Guidance:
    """Base class of guidance rules (protocol: docs/guidance.md; architecture: docs/design.md).

    Subclasses implement :meth:`guide` (combine a full batch of conditional and unconditional
    raw outputs) and may override :meth:`needs_uncond` (per-sample: does this step need the
    unconditional branch?), :meth:`reset` (forget per-generation state; ``fewstep.sample`` and the
    pipeline hook call it once per generation) and :meth:`renoise` (CFG++).

    Counters (reset by :meth:`reset`): ``nfe`` network passes of one branch, ``sample_evals``
    per-sample branch evaluations divided by the batch size, ``uncond_skipped`` per-sample
    unconditional evaluations skipped.
    """

    #: True when the rule hands the scheduler a renoise ``eps`` (CFG++ protocol).
    needs_renoise: bool = False

    def __init__(self) -> None:
        self.nfe = 0
        self.sample_evals = 0.0
        self.uncond_skipped = 0

    # ---- protocol -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget per-generation state (momentum, AG switch, history) and zero the counters."""
        self.nfe = 0
        self.sample_evals = 0.0
        self.uncond_skipped = 0

    def needs_uncond(self, ctx: GuidanceContext) -> torch.Tensor:
        """Per-sample boolean mask (B,): which samples need the unconditional branch now."""
        return torch.ones(ctx.x.shape[0], dtype=torch.bool, device=ctx.x.device)

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor | None, ctx: GuidanceContext) -> torch.Tensor:
        """Guided raw output from the conditional and unconditional raw outputs (full batch)."""
        raise NotImplementedError

    def guide_masked(self, cond: torch.Tensor, uncond: torch.Tensor | None, mask: torch.Tensor,
                     ctx: GuidanceContext) -> torch.Tensor:
        """Like :meth:`guide` when only the samples in ``mask`` have an unconditional output
        (``uncond`` then holds just those rows). Default: guide the masked rows, the others get
        the conditional output (the limit of any rule when the branches agree)."""
        if bool(mask.all()):
            return self.guide(cond, uncond, ctx)
        out = cond.clone()
        if bool(mask.any()):
            out[mask] = self.guide(cond[mask], uncond, ctx.subset(mask))
        return out

    def renoise(self, cond: torch.Tensor, uncond: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor | None:
        """CFG++ protocol: the ``eps`` the scheduler renoises with, or None (plain guidance)."""
        return None

    def check_scheduler(self, scheduler) -> None:
        """Raise ValueError when ``scheduler`` cannot run this rule (CFG++ needs ``supports_renoise``)."""
        if self.needs_renoise and not getattr(scheduler, "supports_renoise", False):
            raise ValueError(
                f"{type(self).__name__} needs a scheduler that implements the CFG++ renoise protocol "
                f"(step(..., renoise_eps=...), supports_renoise = True), e.g. fewstep's DPMSolverPPScheduler "
                f"(solver_order=1 is DDIM); {type(scheduler).__name__} cannot renoise"
            )

    # ---- native evaluation ------------------------------------------------------------------------
    def make_context(self, x, t, scheduler, step_index: int, num_steps: int | None) -> GuidanceContext:
        """Build the step context (reads alpha/sigma from the scheduler)."""
        return GuidanceContext.from_model_input(x, t, scheduler, step_index, num_steps)

    def predict(self, model: Callable, x: torch.Tensor, t, cond, uncond, scheduler=None, step_index: int = 0,
                num_steps: int | None = None):
        """One guided prediction for ``fewstep.sample``.

        Evaluates ``model(x, t, cond)`` over the batch and ``model(x[m], t, uncond[m])`` over the
        samples ``m`` that :meth:`needs_uncond` selects (all of them, a sub-batch when the
        conditions can be sliced, or none), then combines them. When every sample needs both
        branches and the model has ``evaluate_pair(x, t, cond, uncond) -> (out_cond, out_uncond)``
        (:class:`fewstep.models.adapters.Denoiser` does), the two run as one batched call.

        Returns ``(out, renoise_eps, used)``: the guided raw output for ``scheduler.step``, the
        CFG++ renoise ``eps`` or None, and the number of model evaluations made.
        """
        if step_index == 0 and self.needs_renoise:
            self.check_scheduler(scheduler)
        ctx = self.make_context(x, t, scheduler, step_index, num_steps)
        b = x.shape[0]
        mask = self.needs_uncond(ctx).to(torch.bool).reshape(-1)
        if mask.numel() != b:
            raise ValueError(f"needs_uncond returned {mask.numel()} flags for a batch of {b}")
        if bool(mask.any()) and not bool(mask.all()) and not (can_slice(uncond, b) and x.shape[0] == b):
            mask = torch.ones_like(mask)  # the condition cannot be split: evaluate the whole batch
        pair = getattr(model, "evaluate_pair", None)
        out_u = None
        if bool(mask.all()) and pair is not None:  # both branches in one batched network call
            out_c, out_u = pair(x, t, cond, uncond)
        else:
            out_c = model(x, t, cond)
        used = 1
        self.sample_evals += 1.0
        if bool(mask.all()):
            if out_u is None:
                out_u = model(x, t, uncond)
            used += 1
            self.sample_evals += 1.0
        elif bool(mask.any()):
            idx = mask.nonzero().reshape(-1)
            out_u = model(x[idx], t, slice_condition(uncond, idx, b))
            used += 1
            self.sample_evals += float(len(idx)) / b
        self.uncond_skipped += int((~mask).sum())
        self.nfe += used
        out = self.guide_masked(out_c, out_u, mask, ctx)
        ren = None
        if self.needs_renoise:
            if not bool(mask.all()):
                raise ValueError(f"{type(self).__name__} needs the unconditional branch at every step")
            ren = self.renoise(out_c, out_u, ctx)
        return out, ren, used

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> dict:
        return {}
