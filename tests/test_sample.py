"""fewstep.sample: the pipeline loop over a plain callable, with CFG and NFE counting."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import fewstep
from fewstep.samplers import DPMSolverPPScheduler
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
MIX = make_gaussian_mixture(dim=16, num_components=6, num_classes=3, seed=2)


def _manual_loop(model, noise, sched, n, w, c, u):
    sched.set_timesteps(n)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        oc, ou = model(x, t, c), model(x, t, u)
        x = sched.step(ou + w * (oc - ou), t, x).prev_sample
    return x


@pytest.mark.parametrize("sched_cls", [DPMSolverPPScheduler, DPMSolverMultistepScheduler, DDIMScheduler])
def test_sample_equals_the_pipeline_loop_and_counts_nfe(sched_cls):
    model = GaussianMixtureModel(MIX, DPMSolverPPScheduler(**SD).schedule, "epsilon")
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    c, u = torch.tensor([0, 1, 2, 0, 1, 2]), -1
    x, nfe = fewstep.sample(model, noise, sched_cls(**SD), 10, guidance=3.0, cond=c, uncond=u)
    ref = _manual_loop(model, noise, sched_cls(**SD), 10, 3.0, c, u)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert nfe == 20
    _, nfe1 = fewstep.sample(model, noise, sched_cls(**SD), 10, guidance=1.0, cond=c)
    _, nfe0 = fewstep.sample(model, noise, sched_cls(**SD), 10, cond=c)
    assert nfe1 == nfe0 == 10 and model.nfe == 20 + 20 + 10 + 10


def test_conditional_samples_land_in_their_class():
    sched = DPMSolverPPScheduler(**SD, prediction_type="v_prediction")
    model = GaussianMixtureModel(MIX, sched.schedule, "v_prediction")
    noise = torch.randn(30, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.arange(30) % 3
    x, _ = fewstep.sample(model, noise, sched, 12, cond=labels)
    # nearest component mean (in Mahalanobis distance) must belong to the requested class
    d = (((x[:, None, :] - MIX.means[None]) ** 2) / MIX.variances[None]).sum(-1)
    assert torch.equal(MIX.classes[d.argmin(1)], labels)


def test_sde_sampling_is_reproducible_with_a_generator():
    sched = DPMSolverPPScheduler(**SD, algorithm_type="sde-dpmsolver++")
    model = GaussianMixtureModel(MIX, sched.schedule, "epsilon")
    noise = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    a, _ = fewstep.sample(model, noise, sched, 8, generator=torch.Generator().manual_seed(5))
    b, _ = fewstep.sample(model, noise, sched, 8, generator=torch.Generator().manual_seed(5))
    c, _ = fewstep.sample(model, noise, sched, 8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_flow_match_euler_scheduler_without_init_noise_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = DPMSolverPPScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver_order=1)
    model = GaussianMixtureModel(MIX, ours.schedule, "flow_prediction")
    noise = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(6)
    x_ref, _ = fewstep.sample(model, noise, FlowMatchEulerDiscreteScheduler(shift=3.0), 6)
    x, _ = fewstep.sample(model, noise, ours, sigmas=euler.sigmas[:-1].tolist())
    # first-order DPM-Solver++ in flow coordinates is exactly the flow-matching Euler step
    torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


def test_callback_and_bad_guidance():
    sched = DPMSolverPPScheduler(**SD)
    model = GaussianMixtureModel(MIX, sched.schedule, "epsilon")
    seen = []
    fewstep.sample(model, torch.randn(2, 16), sched, 5, callback=lambda i, t, x: seen.append(i))
    assert seen == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match="guidance"):
        fewstep.sample(model, torch.randn(2, 16), sched, 5, guidance=True)
