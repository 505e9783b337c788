"""NoiseSchedule, step grids and prediction conversion, checked against diffusers and closed forms."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from fewstep.schedule import NoiseSchedule, from_x0_eps, make_grid, to_x0_eps

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CONFIGS = [
    dict(),
    SD,
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(SD, rescale_betas_zero_snr=True),
    dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist()),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_discrete_schedule_matches_diffusers_alphas(cfg):
    ref = DDIMScheduler(**cfg).alphas_cumprod.double()
    if cfg.get("rescale_betas_zero_snr"):
        ref[-1] = 2**-24  # diffusers' DPM schedulers' guard against sigma/alpha = inf
    sched = NoiseSchedule.from_config(cfg)
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sched.alpha(t) ** 2, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones(1000, dtype=torch.float64))


def test_lambda_inverse_and_interpolation():
    sched = NoiseSchedule.from_config(SD)
    t = torch.linspace(0, 999, 257, dtype=torch.float64)
    torch.testing.assert_close(sched.t_of_lambda(sched.lambda_(t)), t, atol=1e-8, rtol=0)
    # between integers lambda is linear in t (= diffusers' log-sigma interpolation in _sigma_to_t)
    lam = sched.lambda_(torch.tensor([10.0, 10.25, 11.0], dtype=torch.float64))
    assert lam[1].item() == pytest.approx(0.75 * lam[0].item() + 0.25 * lam[2].item(), abs=1e-12)
    # and lambda decreases
    assert torch.all(torch.diff(sched.lambda_(t)) < 0)


def test_flow_and_edm_closed_forms():
    flow = NoiseSchedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert flow.kind == "flow" and flow.shift == 3.0
    t = np.array([100.0, 500.0, 900.0])
    np.testing.assert_allclose(flow.alpha(t), 1 - t / 1000)
    np.testing.assert_allclose(flow.sigma(t), t / 1000)
    np.testing.assert_allclose(flow.t_of_lambda(flow.lambda_(t)), t)
    edm = NoiseSchedule(kind="edm")
    np.testing.assert_allclose(edm.lambda_(np.array([0.5, 2.0])), -np.log([0.5, 2.0]))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 4, 7, 25, 50])
def test_time_uniform_grids_equal_diffusers(spacing, n):
    cfg = dict(SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref = DPMSolverMultistepScheduler(**cfg)
    ref.set_timesteps(n)
    grid = make_grid(NoiseSchedule.from_config(cfg), n, spacing, steps_offset=cfg["steps_offset"])
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(grid.sigmas_ve, ref.sigmas.double().numpy(), rtol=2e-6)


@pytest.mark.parametrize("n", [3, 10, 30])
def test_karras_and_logsnr_grids_equal_diffusers(n):
    for flag, spacing in (("use_karras_sigmas", "karras"), ("use_lu_lambdas", "logsnr")):
        ref = DPMSolverMultistepScheduler(**SD, **{flag: True})
        ref.set_timesteps(n)
        grid = make_grid(NoiseSchedule.from_config(SD), n, spacing)
        np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
        np.testing.assert_allclose(grid.sigmas_ve, ref.sigmas.double().numpy(), rtol=2e-5)


def test_logsnr_grid_is_uniform_in_lambda_and_sigma_min_has_no_zero_step():
    sched = NoiseSchedule.from_config(SD)
    grid = make_grid(sched, 8, "logsnr", final_sigma="sigma_min", round_timesteps=False)
    lam = grid.lambdas
    assert len(lam) == 9
    np.testing.assert_allclose(np.diff(lam), np.full(8, (lam[-1] - lam[0]) / 8), rtol=1e-9)
    assert lam[-1] == pytest.approx(float(sched.lambda_(0.0)))


def test_time_power_grid_closed_form_trailing_limit_and_scheduler_key():
    cos = NoiseSchedule.from_config(dict(beta_schedule="squaredcos_cap_v2"))
    # t_i = 1000 (1 - i/n)^p - 1: p = 2 is DPM-Solver's time_quadratic with the data at t = -1
    g = make_grid(cos, 5, "time_power", power=2.0)
    np.testing.assert_array_equal(g.timesteps, [999, 639, 359, 159, 39])
    assert g.sigmas[-1] == 0.0 and g.alphas[-1] == 1.0
    np.testing.assert_allclose(g.sigmas[:-1], cos.sigma(g.timesteps), rtol=1e-12)  # exact times, no snapping
    f = make_grid(cos, 6, "time_power", power=1.3, round_timesteps=False).timesteps
    np.testing.assert_allclose(f, 1000 * (1 - np.arange(6) / 6) ** 1.3 - 1, rtol=1e-12)
    # p = 1 is trailing (after rounding) for any n
    for n in (1, 3, 5, 7, 10, 25):
        np.testing.assert_array_equal(make_grid(cos, n, "time_power", power=1.0).timesteps,
                                      make_grid(cos, n, "trailing").timesteps)
    # through the schedulers' config key
    from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler

    s = DPMSolverPPScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="time_power", timestep_power=2.0)
    s.set_timesteps(5)
    np.testing.assert_array_equal(s.timesteps.numpy(), [999, 639, 359, 159, 39])
    v3 = DPMSolverV3Scheduler(beta_schedule="squaredcos_cap_v2", degenerated=True, timestep_spacing="time_power",
                              timestep_power=1.3, round_timesteps=False)
    v3.set_timesteps(6)
    np.testing.assert_allclose(v3.timesteps.numpy(), f, rtol=1e-6)
    # the last point may not fall below t = 0; the exponent must be positive; VP only
    with pytest.raises(ValueError, match="num_inference_steps=32"):
        make_grid(cos, 32, "time_power", power=2.0)
    make_grid(cos, 31, "time_power", power=2.0)
    assert make_grid(cos, 10, "time_power", power=3.0, round_timesteps=False).timesteps[-1] == 0.0  # 10^3 = 1000
    for bad in (0.0, -1.0, float("nan"), "x", True):
        with pytest.raises(ValueError, match="power"):
            make_grid(cos, 5, "time_power", power=bad)
    with pytest.raises(ValueError, match="timestep_power"):
        DPMSolverPPScheduler(timestep_power=0.0)
    with pytest.raises(ValueError, match="time_power"):
        make_grid(NoiseSchedule(kind="edm"), 5, "time_power")


def test_time_power_zero_grid_evaluates_both_ends():
    """``t_i = t_max (1 - i/(n-1))^p``: the first point is ``t_max``, the last ``t = 0`` (so the final
    step into sigma = 0 starts at the smallest noise level), rounded like other time grids; with
    ``final_sigma="sigma_min"`` the n + 1 points end on ``t = 0`` without a zero-length step."""
    sd = NoiseSchedule.from_config(SD)
    g = make_grid(sd, 5, "time_power_zero", power=1.5, round_timesteps=False)
    np.testing.assert_allclose(g.timesteps, 999 * (1 - np.arange(5) / 4) ** 1.5, rtol=1e-12)
    assert g.timesteps[0] == 999 and g.timesteps[-1] == 0 and g.sigmas[-1] == 0.0
    np.testing.assert_allclose(g.sigmas[:-1], sd.sigma(g.timesteps), rtol=1e-12)
    np.testing.assert_array_equal(make_grid(sd, 5, "time_power_zero", power=1.0).timesteps,
                                  np.round(np.linspace(999, 0, 5)))
    np.testing.assert_array_equal(make_grid(sd, 1, "time_power_zero").timesteps, [999])
    m = make_grid(sd, 4, "time_power_zero", power=2.0, final_sigma="sigma_min", round_timesteps=False)
    np.testing.assert_allclose(m.timesteps, 999 * (1 - np.arange(4) / 4) ** 2, rtol=1e-12)
    assert m.sigmas[-1] == pytest.approx(float(sd.sigma(0.0)))
    with pytest.raises(ValueError, match="time_power_zero"):
        make_grid(NoiseSchedule(kind="edm"), 5, "time_power_zero")


def test_explicit_timesteps_and_sigmas():
    sched = NoiseSchedule.from_config(SD)
    g = make_grid(sched, timesteps=[999, 600, 200, 10])
    np.testing.assert_array_equal(g.timesteps, [999, 600, 200, 10])
    assert g.sigmas[-1] == 0.0
    s = make_grid(sched, sigmas=[14.0, 3.0, 0.5, 0.0], round_timesteps=False)
    np.testing.assert_allclose(s.sigmas_ve, [14.0, 3.0, 0.5, 0.0], rtol=1e-9)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample", "flow_prediction"])
def test_prediction_conversion_roundtrip(ptype):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    if ptype == "flow_prediction":
        sigma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
        alpha = 1 - sigma
    else:
        lam = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
        alpha, sigma = torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()
    x = alpha[:, None] * x0 + sigma[:, None] * eps
    out = from_x0_eps(x0, eps, alpha, sigma, ptype)
    x0_r, eps_r = to_x0_eps(out, x, alpha, sigma, ptype)
    torch.testing.assert_close(x0_r, x0)
    torch.testing.assert_close(eps_r, eps)
    if ptype == "v_prediction":  # Salimans & Ho: v = alpha eps - sigma x0
        torch.testing.assert_close(out, alpha[:, None] * eps - sigma[:, None] * x0)


def test_bad_inputs_name_the_argument():
    sched = NoiseSchedule.from_config(SD)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_grid(sched, 0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_grid(sched, 1001)
    with pytest.raises(ValueError, match="spacing"):
        make_grid(sched, 5, "cosine")
    with pytest.raises(ValueError, match="decreasing"):
        make_grid(sched, timesteps=[10, 500])
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config(dict(beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0_eps(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "noise")
    with pytest.raises(TypeError, match="num_inference_steps"):
        make_grid(sched, 4.5)
    assert math.isfinite(float(sched.lambda_(999.0)))


def test_edm_grids_follow_karras_closed_form():
    """EDM/VE schedule: alpha = 1, sigma = t; the Karras grid is Eq. 5 of Karras et al. 2022 between
    sigma_max and sigma_min, logsnr is uniform in log sigma, and the grid ends at sigma = 0."""
    edm = NoiseSchedule(kind="edm", sigma_min=0.002, sigma_max=80.0)
    n, rho = 7, 7.0
    g = make_grid(edm, n, "karras", rho=rho)
    ramp = np.linspace(0, 1, n)
    ref = (80.0 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    np.testing.assert_allclose(g.sigmas[:-1], ref, rtol=1e-12)
    np.testing.assert_allclose(g.alphas, np.ones(n + 1))
    np.testing.assert_allclose(g.timesteps, ref, rtol=1e-12)  # model time t = sigma
    assert g.sigmas[-1] == 0.0
    lg = make_grid(edm, 5, "logsnr")
    np.testing.assert_allclose(np.diff(np.log(lg.sigmas[:-1])), np.full(4, math.log(0.002 / 80.0) / 4), rtol=1e-12)
