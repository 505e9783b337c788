"""Tests of DPMSolverV3Scheduler (DPM-Solver-v3, Zheng et al. 2023, arXiv 2310.13268)."""

import math

import numpy as np
import pytest
import torch

from fewstep.sample import sample
from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler, compute_ems
from fewstep.samplers.dpm_v3 import _psi, derivative_estimates
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture, reference_solve

CFG = dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", round_timesteps=False)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("spacing", ["linspace", "logsnr", "karras"])
def test_degenerated_equals_dpmpp_multistep(order, spacing):
    """l=1, s=0, b=0 (paper App. A.2) reproduces DPM-Solver++ multistep (2M: the Taylor/"heun" form)."""
    pp = DPMSolverPPScheduler(**CFG, solver_order=order, solver_type="heun", timestep_spacing=spacing)
    v3 = DPMSolverV3Scheduler(**CFG, solver_order=order, degenerated=True, use_corrector=False,
                              timestep_spacing=spacing)
    mix = make_gaussian_mixture(dim=8)
    model = GaussianMixtureModel(mix, pp.schedule, "epsilon")
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (5, 8, 20):
        a, _ = sample(model, noise, pp, n)
        b, _ = sample(model, noise, v3, n)
        assert (a - b).abs().max().item() < 1e-5


def test_degenerated_third_order_is_taylor_exact():
    """Order 3 in degenerated mode integrates a quadratic x0(lambda) exactly. DPMSolverPPScheduler's
    3M (like the official code and diffusers) weights D2 by half of the Taylor weight, so the two
    differ at order 3; the v3 step is checked against the exact integral."""
    from scipy.integrate import quad

    from fewstep.samplers.dpmpp import third_order_multistep_update

    h, ls = 0.3, 0.0
    lams = [ls, ls - 0.25, ls - 0.55]
    x0 = lambda lam: 0.7 - 0.4 * (lam - ls) + (lam - ls) ** 2  # noqa: E731
    ms = [torch.tensor(x0(lam), dtype=torch.float64) for lam in lams]
    s_s, s_t = math.exp(-ls), math.exp(-(ls + h))
    exact = s_t / s_s * 1.0 + s_t * quad(lambda lam: math.exp(lam) * x0(lam), ls, ls + h)[0]
    gs = [-m for m in ms]
    d = derivative_estimates(lams, gs, False)
    c = _psi(h, 3)
    v3 = math.exp(-h) * 1.0 - c[0] * gs[0] - c[1] * d[0] - c[2] * d[1]
    assert abs(v3.item() - exact) < 1e-10
    base = third_order_multistep_update(torch.tensor(1.0, dtype=torch.float64), ms, lams, ls + h, 1.0, s_t, s_s)
    assert abs(base.item() - exact) > 1e-4  # documented discrepancy of 3M


def test_pseudo_order_divided_differences():
    lams = [0.0, -0.3, -0.7, -1.2]
    poly = lambda lam: 1 + 2 * lam - lam**2 + 0.5 * lam**3  # noqa: E731
    gs = [torch.tensor(poly(lam), dtype=torch.float64) for lam in lams]
    d = derivative_estimates(lams, gs, False)  # interpolating cubic: exact derivatives at lams[0]
    assert abs(d[0].item() - 2) < 1e-9 and abs(d[1].item() + 2) < 1e-9 and abs(d[2].item() - 3) < 1e-9
    p = derivative_estimates(lams, gs, True)  # k-th derivative from the k + 1 newest points only
    slope = (gs[0] - gs[1]).item() / (lams[0] - lams[1])
    assert abs(p[0].item() - slope) < 1e-9 and abs(p[2].item() - 3) < 1e-9
    d2 = derivative_estimates(lams[:3], gs[:3], True)  # 2 derivatives from 3 points: pseudo != standard
    d2s = derivative_estimates(lams[:3], gs[:3], False)
    assert abs(d2[1].item() - d2s[1].item()) < 1e-9 and abs(d2[0].item() - d2s[0].item()) > 1e-3


@pytest.fixture(scope="module")
def mixture_ems():
    cfg = dict(beta_schedule="linear", prediction_type="epsilon")
    sched = DPMSolverPPScheduler(**cfg)
    mix = make_gaussian_mixture(dim=16, seed=0)
    model = GaussianMixtureModel(mix, sched.schedule, "epsilon")
    x0 = mix.sample(256, generator=torch.Generator().manual_seed(1))
    ems = compute_ems(model, sched.config, x0, num_grid=100, batch_size=256, dtype=torch.float64,
                      progress=False)
    return cfg, mix, model, ems


def test_v3_beats_dpmpp_on_mixture(mixture_ems):
    """Measured: v3 with EMS from the mixture's samples against DPM-Solver++ at 8 NFE, RMSE to the
    reference ODE solution (can fail: it is a measurement)."""
    cfg, mix, model, ems = mixture_ems
    noise = torch.randn(48, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s0 = math.exp(-float(model.schedule.lambda_(999.0)))
    ref = reference_solve(mix, noise * math.sqrt(1 + s0**2), s0, 0.0)

    def rmse(s):
        x, _ = sample(model, noise, s, 8)
        return ((x - ref) ** 2).mean().sqrt().item()

    pp = min(rmse(DPMSolverPPScheduler(**cfg, solver_order=o, timestep_spacing="logsnr")) for o in (2, 3))
    v3 = rmse(DPMSolverV3Scheduler(**cfg, solver_order=3, timestep_spacing="logsnr", ems=ems))
    assert v3 < pp


def test_from_config_from_pretrained_and_snapping(mixture_ems, tmp_path):
    cfg, _, _, ems = mixture_ems
    base = DPMSolverPPScheduler(**cfg)
    s = DPMSolverV3Scheduler.from_config(base.config, ems=ems)
    assert s.uses_ems
    path = ems.save(tmp_path / "e.safetensors")
    s2 = DPMSolverV3Scheduler.from_config(base.config, ems=str(path))
    s2.set_timesteps(6)
    lam = s2._lambdas[:-1]
    assert np.all(np.isin(np.round(lam, 8), np.round(ems.lambdas, 8)))  # snapped to the EMS grid
    s2.save_pretrained(tmp_path / "sched")
    s3 = DPMSolverV3Scheduler.from_pretrained(tmp_path / "sched")
    assert s3.uses_ems and s3.config.ems_file == "ems.safetensors"
    np.testing.assert_array_equal(s3.ems.l, ems.l)


def test_bad_inputs(mixture_ems):
    cfg, _, _, ems = mixture_ems
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverV3Scheduler(**cfg, solver_order=4, ems=ems)
    with pytest.raises(ValueError, match="half_region"):
        DPMSolverV3Scheduler(**cfg, half_region="middle", ems=ems)
    with pytest.raises(ValueError, match="noise schedule"):
        DPMSolverV3Scheduler(beta_schedule="squaredcos_cap_v2", ems=ems)
    s = DPMSolverV3Scheduler(**cfg, ems=ems)
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(2, 8), s.timesteps[0], torch.zeros(2, 8))
    with pytest.warns(UserWarning, match="degenerated"):
        d = DPMSolverV3Scheduler(**cfg)
    assert not d.uses_ems
    with pytest.raises(FileNotFoundError):
        DPMSolverV3Scheduler(**cfg, ems="/nonexistent/ems.safetensors")


def test_cfg_and_prediction_types(mixture_ems):
    """v / sample predictions give the same trajectory as epsilon; CFG through fewstep.sample runs."""
    cfg, mix, _, ems = mixture_ems
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outs = []
    for pt in ("epsilon", "v_prediction", "sample"):
        c = dict(cfg, prediction_type=pt)
        s = DPMSolverV3Scheduler(**c, solver_order=3, ems=ems)
        m = GaussianMixtureModel(mix, s.schedule, pt)
        outs.append(sample(m, noise, s, 6)[0])
    assert (outs[0] - outs[1]).abs().max() < 1e-6 and (outs[0] - outs[2]).abs().max() < 1e-6
    s = DPMSolverV3Scheduler(**cfg, ems=ems, half=True)
    m = GaussianMixtureModel(mix, s.schedule, "epsilon")
    x, nfe = sample(m, noise, s, 6, guidance=2.0, cond=torch.zeros(8, dtype=torch.long), uncond=-1)
    assert nfe == 12 and torch.isfinite(x).all()


def test_more_steps_than_the_ems_grid_resolves(mixture_ems):
    """A sampling grid finer than the EMS grid (here 150 logSNR steps on a 100-interval EMS) would
    snap two points onto one EMS point; the scheduler interpolates the EMS onto a finer grid
    instead, warns, and keeps converging: the error is far below the 8-step one and near the
    float64 reference."""
    cfg, mix, model, ems = mixture_ems
    noise = torch.randn(24, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    s0 = math.exp(-float(model.schedule.lambda_(999.0)))
    ref = reference_solve(mix, noise * math.sqrt(1 + s0**2), s0, 0.0)

    def rmse(n):
        s = DPMSolverV3Scheduler(**cfg, solver_order=3, timestep_spacing="logsnr", ems=ems)
        x, _ = sample(model, noise, s, n)
        return ((x - ref) ** 2).mean().sqrt().item(), s

    with pytest.warns(UserWarning, match="finer than the EMS grid"):
        fine, s = rmse(150)
    assert len(s.timesteps) == 150 and len(np.unique(s._lambdas)) == 151
    coarse, _ = rmse(8)
    assert fine < 0.05 * coarse and fine < 1e-3


def test_refined_ems_keeps_points_and_interpolates_linearly(mixture_ems):
    _, _, model, ems = mixture_ems
    r = ems.refined(3, model.schedule.t_of_lambda)
    assert r.num_grid == 3 * ems.num_grid and r.metadata["refined_from_num_grid"] == ems.num_grid
    np.testing.assert_array_equal(r.lambdas[::3], ems.lambdas)
    np.testing.assert_array_equal(r.timesteps[::3], ems.timesteps)
    for k in ("l", "s", "b"):
        np.testing.assert_array_equal(getattr(r, k)[::3], getattr(ems, k))
        a = getattr(ems, k)
        np.testing.assert_allclose(getattr(r, k)[1::3], (2 * a[:-1] + a[1:]) / 3, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r.lambdas, np.linspace(ems.lambdas[0], ems.lambdas[-1], 3 * ems.num_grid + 1),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.schedule.lambda_(r.timesteps), r.lambdas, rtol=0, atol=1e-8)
    assert ems.refined(1, model.schedule.t_of_lambda) is ems
    lam = np.random.default_rng(0).uniform(ems.lambdas[0], ems.lambdas[-1], 50)
    np.testing.assert_array_equal(ems.index_of(lam, refine=3), r.index_of(lam))  # the scheduler's check
