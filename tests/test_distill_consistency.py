"""Consistency functions and the consistency sampler against diffusers' LCM code and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from fewstep.distill.consistency import (
    ConsistencyScheduler,
    boundary_scalings,
    consistency_output,
    lcm_timesteps,
    sampling_timesteps,
    training_grid,
)
from fewstep.models.pipeline import load_digits_scheduler_config
from fewstep.models.students import guidance_scale_embedding
from fewstep.schedule import NoiseSchedule, edm_preconditioning, from_x0_eps
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

DIGITS = load_digits_scheduler_config()
SCHEDULE = NoiseSchedule.from_config(DIGITS)


@pytest.mark.parametrize("dim", [64, 256, 7])
def test_guidance_embedding_matches_diffusers_lcm_pipeline(dim):
    w = torch.tensor([0.0, 0.5, 1.0, 4.0, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(guidance_scale_embedding(w, dim), ref)


def test_lcm_scalings_match_lcm_scheduler():
    sched = LCMScheduler.from_config(DIGITS)
    t = torch.tensor([0, 1, 5, 19, 20, 259, 999])
    c_skip, c_out = boundary_scalings(t, SCHEDULE, "lcm")
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-12)
        assert c_out[i].item() == pytest.approx(ref_out, rel=1e-12, abs=1e-15)
    assert c_skip[0] == 1 and c_out[0] == 0  # boundary


def test_cm_scalings_are_song_et_al_around_edm_preconditioning():
    """f = c_skip_CM y + c_out_CM F with F the EDM raw output of x0_hat (written with fewstep's EDM
    conversion, an independent code path), y = x / alpha, s = sigma / alpha (Song et al. 2023, App. C)."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.0, 1.0, 10.0, 100.0, 500.0, 900.0, 999.0], dtype=torch.float64)
    x = torch.randn(len(t), 64, generator=g, dtype=torch.float64)
    v = torch.randn(len(t), 64, generator=g, dtype=torch.float64)
    f = consistency_output(v, x, t, SCHEDULE, "v_prediction", "cm", t_min=0.0)

    a = torch.as_tensor(SCHEDULE.alpha(t))[:, None]
    s = torch.as_tensor(SCHEDULE.sigma(t))[:, None]
    x0 = a * x - s * v  # v-prediction, Salimans & Ho 2022
    eps = s * x + a * v
    s_ve, s_min, sd = (s / a), float(SCHEDULE.sigma_ve(0.0)), 0.5
    F = from_x0_eps(x0, eps, a, s, "epsilon", sigma_data=sd)  # EDM F with D = c_skip y + c_out F
    c_skip_e, c_out_e, _, _ = edm_preconditioning(s_ve, sd)
    y = x / a
    torch.testing.assert_close(c_skip_e * y + c_out_e * F, x0, rtol=1e-9, atol=1e-9)  # sanity of F
    c_skip_cm = sd**2 / ((s_ve - s_min) ** 2 + sd**2)
    c_out_cm = (s_ve - s_min) * sd / torch.sqrt(s_ve**2 + sd**2)
    ref = c_skip_cm * y + c_out_cm * F
    torch.testing.assert_close(f, ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(f[0], y[0], rtol=0, atol=1e-12)  # boundary: f(x, t_min) = x / alpha
    torch.testing.assert_close(f[-1], x0[-1], rtol=1e-6, atol=1e-6)  # high noise: the x0 prediction


def test_times_below_boundary_are_refused():
    with pytest.raises(ValueError, match="t_min"):
        boundary_scalings(torch.tensor([3.0]), SCHEDULE, "cm", t_min=5.0)
    with pytest.raises(ValueError, match="boundary"):
        boundary_scalings(torch.tensor([3.0]), SCHEDULE, "edm")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 50])
def test_lcm_timesteps_match_lcm_scheduler(n):
    sched = LCMScheduler.from_config(DIGITS)
    sched.set_timesteps(n)
    assert lcm_timesteps(n, 50, 1000) == sched.timesteps.tolist()
    grid = training_grid(SCHEDULE, 50, "trailing")
    assert sampling_timesteps(grid, n) == sched.timesteps.tolist()


def test_training_grid_is_lcm_ddim_grid_plus_boundary():
    grid = training_grid(SCHEDULE, 50, "trailing")
    np.testing.assert_array_equal(grid, np.array([0] + [20 * i - 1 for i in range(1, 51)], dtype=float))
    full = training_grid(SCHEDULE, 1000, "trailing")
    np.testing.assert_array_equal(full, np.arange(1000, dtype=float))


def _mixture_model():
    mix = make_gaussian_mixture(dim=64, num_components=6, num_classes=3, seed=0)
    return GaussianMixtureModel(mix, SCHEDULE, "v_prediction")


@pytest.mark.parametrize("n", [1, 2, 4])
def test_consistency_scheduler_lcm_boundary_equals_lcm_scheduler(n):
    """The same sampling loop through LCMScheduler and ConsistencyScheduler(boundary='lcm'), with the same
    generator: the fresh re-noising draws coincide, the samples agree to float32 precision."""
    model = _mixture_model()
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 3
    outs = []
    for sched in (LCMScheduler.from_config(DIGITS), ConsistencyScheduler.from_config({**DIGITS, "boundary": "lcm"})):
        sched.set_timesteps(n)
        g = torch.Generator().manual_seed(5)
        x = noise.clone()
        for t in sched.timesteps:
            x = sched.step(model(x, t, labels), t, x, generator=g).prev_sample
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_consistency_scheduler_multistep_renoises_with_fresh_noise():
    """Two steps = f at t0, then alpha(t1) x0 + sigma(t1) z with z the generator's next draw, then f at t1."""
    model = _mixture_model()
    sched = ConsistencyScheduler.from_config({**DIGITS, "boundary": "cm"})
    sched.set_timesteps(timesteps=[999, 400])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0])
    g = torch.Generator().manual_seed(9)
    out0 = sched.step(model(x, 999, labels), 999, x, generator=g)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    a, s = float(SCHEDULE.alpha(400.0)), float(SCHEDULE.sigma(400.0))
    torch.testing.assert_close(out0.prev_sample, a * out0.denoised + s * z)
    out1 = sched.step(model(out0.prev_sample, 400, labels), 400, out0.prev_sample, generator=g)
    ref = consistency_output(model(out0.prev_sample, 400, labels), out0.prev_sample, 400.0, SCHEDULE, "v_prediction")
    torch.testing.assert_close(out1.prev_sample, ref)
    assert math.isclose(float(out1.prev_sample.sub(out1.denoised).abs().max()), 0.0)


def test_scheduler_bad_inputs():
    sched = ConsistencyScheduler.from_config(DIGITS)
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="decreasing"):
        sched.set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(51)
    with pytest.raises(ValueError, match="step_timesteps"):
        ConsistencyScheduler(step_timesteps={"2": [999]})
    with pytest.raises(ValueError, match="set_timesteps"):
        ConsistencyScheduler().step(torch.zeros(1, 1), 999, torch.zeros(1, 1))
    table = ConsistencyScheduler(step_timesteps={"2": [999, 600]})
    table.set_timesteps(2)
    assert table.timesteps.tolist() == [999, 600]
