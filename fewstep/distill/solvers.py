"""Teacher ODE steps between two points of a consistency-distillation grid, per sample.

Consistency distillation needs ``x_hat_{t_n} = Phi(x_{t_{n+k}}, t_{n+k} -> t_n)``, one step of a
numerical solver of the teacher's probability-flow ODE, where every sample of the batch has its
own pair of times. The solvers here take per-sample times (B,) and the teacher as a callable
``teacher(x, t, batch_indices) -> raw output`` (classifier-free guidance, if any, already inside),
and work in float64 noise levels from :class:`fewstep.schedule.NoiseSchedule`:

* ``"ddim"`` -- DDIM (Song et al. 2021, Eq. 12 with eta = 0) = DPM-Solver++(1) (Lu et al. 2022,
  Eq. 10): ``x_to = alpha_to x0_hat + sigma_to eps_hat``. It is also exactly the Euler step of
  Karras et al. 2022 (Alg. 1 without the correction) in the VE variables ``y = x / alpha``,
  ``s = sigma / alpha``: ``y_to = y + (s_to - s) (y - x0_hat) / s``. ``"euler"`` names the same
  update (the CM paper's "Euler" solver on an EDM teacher). One teacher call.
* ``"heun"`` -- Karras et al. 2022, Alg. 1 (Heun's 2nd-order method) in ``(y, s)``: an Euler
  predictor, then the average of the slopes at both ends. Two teacher calls (one when ``s_to = 0``).
* ``"scheduler"`` -- any diffusers or fewstep scheduler whose ``set_timesteps`` accepts
  ``timesteps=`` (fewstep ``DPMSolverPPScheduler``/``DPMSolverV3Scheduler``, diffusers
  ``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``...): samples sharing a pair of times are
  solved together with the scheduler run over ``[t_from, ..., t_to]`` (``substeps + 1`` integer
  points) and stopped at ``t_to``. Costs one scheduler run per distinct pair in the batch.

``substeps`` > 1 splits the interval into equal pieces in ``t`` (useful with a skip ``k`` > 1 to
pass through the intermediate grid points).
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import torch

from ..schedule import NoiseSchedule, to_x0_eps

SOLVERS = ("ddim", "euler", "heun", "scheduler")

Teacher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _col(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return v.to(device=ref.device, dtype=ref.dtype).reshape(-1, *([1] * (ref.ndim - 1)))


def _levels(schedule: NoiseSchedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tc = t.detach().double().cpu()
    return (torch.as_tensor(schedule.alpha(tc), dtype=torch.float64),
            torch.as_tensor(schedule.sigma(tc), dtype=torch.float64))


def _x0_eps(teacher: Teacher, x, t, rows, schedule, prediction_type):
    a, s = _levels(schedule, t)
    out = teacher(x, t.to(x.device), rows)
    return to_x0_eps(out, x, _col(a, x), _col(s, x), prediction_type)


def ddim_step(teacher: Teacher, x, t_from, t_to, rows, schedule: NoiseSchedule, prediction_type: str):
    """One DDIM (= DPM-Solver++(1) = VE Euler) step per sample from ``t_from`` to ``t_to`` ((B,) each)."""
    x0, eps = _x0_eps(teacher, x, t_from, rows, schedule, prediction_type)
    a_to, s_to = _levels(schedule, t_to)
    return _col(a_to, x) * x0 + _col(s_to, x) * eps


def heun_step(teacher: Teacher, x, t_from, t_to, rows, schedule: NoiseSchedule, prediction_type: str):
    """One Heun step per sample (Karras et al. 2022, Alg. 1, lines 5-8) in ``y = x/alpha``, ``s = sigma/alpha``."""
    a_from, s_from = _levels(schedule, t_from)
    a_to, s_to = _levels(schedule, t_to)
    ve_from, ve_to = s_from / a_from, s_to / a_to
    x0, _ = _x0_eps(teacher, x, t_from, rows, schedule, prediction_type)
    y = x / _col(a_from, x)
    d = (y - x0) / _col(ve_from, x)
    h = _col(ve_to - ve_from, x)
    y_pred = y + h * d
    second = ve_to > 0
    if bool(second.any()):
        x0b, _ = _x0_eps(teacher, y_pred * _col(a_to, x), t_to, rows, schedule, prediction_type)
        d2 = (y_pred - x0b) / _col(torch.where(second, ve_to, torch.ones_like(ve_to)), x)
        y_heun = y + h * 0.5 * (d + d2)
        y_pred = torch.where(_col(second, x).bool(), y_heun, y_pred)
    return y_pred * _col(a_to, x)


def scheduler_step(teacher: Teacher, x, t_from, t_to, rows, scheduler, substeps: int = 1):
    """Run ``scheduler`` from ``t_from`` to ``t_to`` per group of samples sharing both times.

    The scheduler gets ``set_timesteps(timesteps=[t_from, ..., t_to])`` (``substeps + 1`` integer
    points, decreasing) and is stepped ``substeps`` times, which ends exactly on ``t_to``.
    """
    params = inspect.signature(scheduler.set_timesteps).parameters
    if "timesteps" not in params:
        raise ValueError(f"solver 'scheduler' needs a scheduler whose set_timesteps accepts timesteps=; "
                         f"{type(scheduler).__name__} does not")
    out = torch.empty_like(x)
    pairs = torch.stack([t_from.double().cpu(), t_to.double().cpu()], 1)
    uniq, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    step_kwargs = {}
    for g, (a, b) in enumerate(uniq.tolist()):
        idx = (inverse == g).nonzero().flatten()
        pts = np.unique(np.round(np.linspace(a, b, substeps + 1)))[::-1]
        if len(pts) < 2:
            raise ValueError(f"solver 'scheduler' needs distinct integer times, got {a} -> {b}")
        scheduler.set_timesteps(timesteps=[int(v) for v in pts], device=x.device)
        xs = x[idx.to(x.device)]
        sub_rows = rows[idx.to(rows.device)]
        for t in scheduler.timesteps[: len(pts) - 1]:
            t_rows = torch.full((len(idx),), float(t), dtype=torch.float64, device=x.device)
            raw = teacher(scheduler.scale_model_input(xs, t), t_rows, sub_rows)
            xs = scheduler.step(raw, t, xs, return_dict=False, **step_kwargs)[0]
        out[idx.to(x.device)] = xs
    return out


def teacher_solve(
    solver: str,
    teacher: Teacher,
    x: torch.Tensor,
    t_from: torch.Tensor,
    t_to: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str,
    substeps: int = 1,
    scheduler=None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve the teacher's PF-ODE per sample from ``t_from`` to ``t_to`` ((B,) times, ``t_to <
    t_from``) with ``solver`` (see the module docstring) in ``substeps`` equal pieces of ``t``.
    ``rows`` (default ``arange(B)``) is handed to ``teacher`` so that it can pick each sample's
    condition. Returns the state at ``t_to``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not supported; allowed: {', '.join(map(repr, SOLVERS))}")
    if rows is None:
        rows = torch.arange(x.shape[0], device=x.device)
    if solver == "scheduler":
        if scheduler is None:
            raise ValueError("solver 'scheduler' needs a scheduler instance")
        return scheduler_step(teacher, x, t_from, t_to, rows, scheduler, substeps)
    fn = heun_step if solver == "heun" else ddim_step
    t_from, t_to = t_from.double(), t_to.double()
    for i in range(substeps):
        a = t_from + (t_to - t_from) * (i / substeps)
        b = t_from + (t_to - t_from) * ((i + 1) / substeps)
        x = fn(teacher, x, a, b, rows, schedule, prediction_type)
    return x
