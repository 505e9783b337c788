"""Teacher ODE steps of consistency distillation: against diffusers' DDIM, the exact Gaussian-mixture
ODE (order of accuracy) and a scheduler run."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from fewstep.distill.solvers import teacher_solve
from fewstep.models.pipeline import load_digits_scheduler_config
from fewstep.samplers import DPMSolverPPScheduler
from fewstep.schedule import NoiseSchedule
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture, reference_solve

CONFIG = load_digits_scheduler_config()
S = NoiseSchedule.from_config(CONFIG)
MIX = make_gaussian_mixture(dim=16, num_components=4, num_classes=2, seed=0)
MODEL = GaussianMixtureModel(MIX, S, "v_prediction")
LABELS = torch.arange(8) % 2
X = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def teacher(x, t, rows):
    return MODEL(x, t, LABELS[rows])


def _times(a, b, n=8):
    return torch.full((n,), float(a), dtype=torch.float64), torch.full((n,), float(b), dtype=torch.float64)


def _reference(x, a, b, labels=LABELS):
    aa, sa, ab, sb = (float(v) for v in (S.alpha(a), S.sigma(a), S.alpha(b), S.sigma(b)))
    return reference_solve(MIX, x / aa, sa / aa, sb / ab, labels) * ab


def test_ddim_equals_diffusers_ddim_step():
    sched = DDIMScheduler.from_config(CONFIG)
    sched.set_timesteps(50)  # trailing: 999, 979, ...
    t = int(sched.timesteps[3])
    ref = sched.step(MODEL(X, t, LABELS), t, X, eta=0.0).prev_sample
    got = teacher_solve("ddim", teacher, X, *_times(t, t - 20), S, "v_prediction")
    torch.testing.assert_close(got, ref.double(), rtol=1e-5, atol=1e-6)


def test_euler_is_ve_euler_and_equals_ddim():
    """DDIM is Euler's method in y = x / alpha over s = sigma / alpha (Karras et al. 2022, Alg. 1)."""
    a, b = 700.0, 650.0
    aa, sa, ab, sb = (float(v) for v in (S.alpha(a), S.sigma(a), S.alpha(b), S.sigma(b)))
    out = MODEL(X, a, LABELS)
    x0 = aa * X - sa * out
    y = X / aa
    y_next = y + (sb / ab - sa / aa) * (y - x0) / (sa / aa)
    for solver in ("ddim", "euler"):
        torch.testing.assert_close(teacher_solve(solver, teacher, X, *_times(a, b), S, "v_prediction"), y_next * ab)


def test_per_sample_times_equal_separate_solves():
    tf = torch.tensor([999.0, 999, 500, 500, 120, 40, 19, 600], dtype=torch.float64)
    tt = torch.tensor([979.0, 900, 480, 400, 100, 0, 0, 599], dtype=torch.float64)
    for solver in ("ddim", "heun"):
        got = teacher_solve(solver, teacher, X, tf, tt, S, "v_prediction")
        for i in range(8):
            one = teacher_solve(solver, lambda x, t, r, i=i: MODEL(x, t, LABELS[i:i + 1]), X[i:i + 1], tf[i:i + 1],
                                tt[i:i + 1], S, "v_prediction")
            torch.testing.assert_close(got[i:i + 1], one)


@pytest.mark.parametrize("start", [800, 600])
def test_orders_of_accuracy_against_the_exact_ode(start):
    """Local error of one step vs the DOP853 solution of the mixture's ODE: halving the step divides
    DDIM's error by ~4 (first order, local O(h^2)) and Heun's by ~8 (second order, local O(h^3)); Heun
    is far more accurate than DDIM at equal step."""
    err = {}
    for solver in ("ddim", "heun"):
        for h in (40, 20):
            got = teacher_solve(solver, teacher, X, *_times(start, start - h), S, "v_prediction")
            err[solver, h] = (got - _reference(X, start, start - h)).norm().item()
    assert 3.0 < err["ddim", 40] / err["ddim", 20] < 5.0
    assert 6.0 < err["heun", 40] / err["heun", 20] < 11.0
    assert err["heun", 20] < 0.2 * err["ddim", 20]


def test_substeps_pass_through_the_intermediate_points():
    one = teacher_solve("ddim", teacher, X, *_times(600, 560), S, "v_prediction")
    two = teacher_solve("ddim", teacher, one, *_times(560, 520), S, "v_prediction")
    torch.testing.assert_close(teacher_solve("ddim", teacher, X, *_times(600, 520), S, "v_prediction", substeps=2), two)


def test_scheduler_solver():
    """A first-order fewstep DPM-Solver++ run over one interval is DDIM; 2M over m sub-steps converges at
    second order in m against the exact ODE (DDIM at first order); samples of two time pairs in one
    batch are solved as two groups, equal to two separate calls."""
    first = DPMSolverPPScheduler.from_config({**CONFIG, "solver_order": 1})
    got = teacher_solve("scheduler", teacher, X, *_times(600, 560), S, "v_prediction", scheduler=first)
    torch.testing.assert_close(got, teacher_solve("ddim", teacher, X, *_times(600, 560), S, "v_prediction"),
                               rtol=1e-5, atol=1e-6)
    second = DPMSolverPPScheduler.from_config({**CONFIG, "solver_order": 2})
    ref = _reference(X, 600, 520)
    err = {}
    for m in (4, 8):
        err["2m", m] = (teacher_solve("scheduler", teacher, X, *_times(600, 520), S, "v_prediction", m, second)
                        - ref).norm()
        err["ddim", m] = (teacher_solve("ddim", teacher, X, *_times(600, 520), S, "v_prediction", m) - ref).norm()
    assert err["2m", 4] / err["2m", 8] > 3.0 and err["ddim", 4] / err["ddim", 8] < 2.5
    assert err["2m", 8] < 0.25 * err["ddim", 8]
    tf = torch.tensor([600.0] * 4 + [300.0] * 4, dtype=torch.float64)
    both = teacher_solve("scheduler", teacher, X, tf, tf - 80, S, "v_prediction", 4, second)
    for sl, a in ((slice(0, 4), 600), (slice(4, 8), 300)):
        one = teacher_solve("scheduler", lambda x, t, r, sl=sl: MODEL(x, t, LABELS[sl][r]), X[sl],
                            *_times(a, a - 80, 4), S, "v_prediction", 4, second)
        torch.testing.assert_close(both[sl], one)


def test_bad_solver_inputs():
    with pytest.raises(ValueError, match="solver"):
        teacher_solve("rk45", teacher, X, *_times(600, 560), S, "v_prediction")
    with pytest.raises(ValueError, match="scheduler instance"):
        teacher_solve("scheduler", teacher, X, *_times(600, 560), S, "v_prediction")
    with pytest.raises(ValueError, match="timesteps="):
        teacher_solve("scheduler", teacher, X, *_times(600, 560), S, "v_prediction",
                      scheduler=DDIMScheduler.from_config(CONFIG))
