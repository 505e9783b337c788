"""Guidance rules on the exact Gaussian mixture and on random tensors (native path)."""

import pytest
import torch

from fewstep.guidance import (
    APG,
    CFG,
    AdaptiveGuidance,
    CFGPlusPlus,
    GuidanceContext,
    GuidanceRescale,
    LinearAG,
    fit_linear_ag,
)
from fewstep.sample import sample
from fewstep.samplers import DPMSolverPPScheduler
from fewstep.schedule import from_x0_eps, to_x0_eps
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
N = 12


def _setup(pt="v_prediction", order=2, batch=16, seed=0):
    torch.manual_seed(0)  # make_gaussian_mixture draws its weights from the global RNG
    mix = make_gaussian_mixture(dim=16, num_components=6, num_classes=3)
    sch = DPMSolverPPScheduler(**SD, prediction_type=pt, solver_order=order)
    model = GaussianMixtureModel(mix, sch.schedule, pt)
    noise = torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    c = torch.arange(batch) % 3
    u = torch.full((batch,), -1)
    return model, sch, noise, c, u


def _traj(model, sch, noise, guidance, c, u, steps=N):
    xs = []
    x, nfe = sample(model, noise, sch, steps, guidance=guidance, cond=c, uncond=u,
                    callback=lambda i, t, x: xs.append(x.clone()))
    return xs, nfe


# ---------------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("space", ["x0", "eps", "output"])
def test_reductions_to_cfg(space):
    model, sch, noise, c, u = _setup()
    ref, nfe_ref = sample(model, noise, sch, N, guidance=3.0, cond=c, uncond=u)
    assert nfe_ref == 2 * N
    for g in [CFG(3.0), APG(3.0, eta=1.0, space=space), GuidanceRescale(0.0, scale=3.0, space=space),
              AdaptiveGuidance(3.0, threshold=1.0, space=space),
              LinearAG({"num_steps": N, "start_step": N, "space": space, "scale": 3.0, "coefficients": []})]:
        x, nfe = sample(model, noise, sch, N, guidance=g, cond=c, uncond=u)
        assert nfe == 2 * N, g
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-12, msg=repr(g))
    # the exact-arithmetic rules give the identical bits
    for g in [CFG(3.0), AdaptiveGuidance(3.0, threshold=1.0), GuidanceRescale(0.0, scale=3.0)]:
        assert torch.equal(sample(model, noise, sch, N, guidance=g, cond=c, uncond=u)[0], ref)
    # scale 1 is the conditional model
    cond_only, nfe1 = sample(model, noise, sch, N, guidance=None, cond=c)
    assert nfe1 == N
    torch.testing.assert_close(sample(model, noise, sch, N, guidance=APG(1.0, momentum=-0.5, norm_threshold=0.3),
                                      cond=c, uncond=u)[0], cond_only, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- APG
def _algorithm1(pred_cond, pred_uncond, w, eta, r, beta, state):
    """Direct transcription of APG's Algorithm 1 for (B, C, H, W) tensors."""
    diff = pred_cond - pred_uncond
    if beta != 0:
        state["avg"] = diff + beta * state.get("avg", 0)
        diff = state["avg"]
    if r > 0:
        n = diff.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(n), r / n)
    v1 = torch.nn.functional.normalize(pred_cond.double(), dim=[-1, -2, -3])
    par = (diff.double() * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    orth = diff.double() - par
    return pred_cond + (w - 1) * (orth + eta * par).to(pred_cond.dtype)


@pytest.mark.parametrize("eta,r,beta", [(0.0, 0.0, 0.0), (0.0, 2.0, -0.5), (0.3, 5.0, 0.5), (1.0, 1.0, -0.75)])
def test_apg_matches_algorithm1(eta, r, beta):
    g = torch.Generator().manual_seed(1)
    apg = APG(7.0, eta=eta, norm_threshold=r, momentum=beta, space="output")
    apg.reset()
    state = {}
    x = torch.randn(3, 2, 4, 5, generator=g)
    ctx = GuidanceContext(x, 500, 0.6, 0.8)
    for _ in range(4):  # several steps: exercises the momentum buffer
        c, u = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)
        torch.testing.assert_close(apg.guide(c, u, ctx), _algorithm1(c, u, 7.0, eta, r, beta, state))
    apg.reset()  # momentum state is per generation
    c, u = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)
    torch.testing.assert_close(apg.guide(c, u, ctx), _algorithm1(c, u, 7.0, eta, r, beta, {}))


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "flow_prediction"])
def test_apg_x0_space(pt):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    c, u = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                 dtype=torch.float64)
    a, s = (0.7, 0.3) if pt == "flow_prediction" else (0.6, 0.8)
    ctx = GuidanceContext(x, 300, a, s, pt)
    out = APG(5.0, eta=0.2, norm_threshold=3.0, space="x0").guide(c, u, ctx)
    x0c, _ = to_x0_eps(c, x, a, s, pt)
    x0u, _ = to_x0_eps(u, x, a, s, pt)
    x0g = _algorithm1(x0c, x0u, 5.0, 0.2, 3.0, 0.0, {})
    ref = from_x0_eps(x0g, (x - a * x0g) / s, a, s, pt)
    torch.testing.assert_close(out, ref)
    # the output's data prediction is the guided one
    torch.testing.assert_close(to_x0_eps(out, x, a, s, pt)[0], x0g)


def test_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(3)
    c, u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ctx = GuidanceContext(torch.randn(2, 4, 8, 8, generator=g), 10, 0.9, 0.4)
    cfg = u + 6.0 * (c - u)
    ref = rescale_noise_cfg(cfg, c, guidance_rescale=0.7)
    torch.testing.assert_close(GuidanceRescale(0.7, scale=6.0).guide(c, u, ctx), ref)


# ---------------------------------------------------------------------------------- AG
def test_ag_equals_cfg_before_switch_and_saves_evaluations():
    model, sch, noise, c, u = _setup(batch=8)
    ref, nfe_ref = _traj(model, sch, noise, 3.0, c, u)
    ag = AdaptiveGuidance(3.0, threshold=0.99, per_sample=False)
    xs, nfe = _traj(model, sch, noise, ag, c, u)
    k = ag.switch_steps[0]
    assert k is not None and 0 < k < N - 1 and all(s == k for s in ag.switch_steps)
    for i in range(k + 1):  # steps up to and including the switch step are guided: identical bits
        assert torch.equal(xs[i], ref[i]), i
    assert not torch.equal(xs[k + 1], ref[k + 1])
    assert nfe == 2 * (k + 1) + (N - k - 1) == ag.nfe


def test_ag_per_sample_decisions_are_independent():
    model, sch, noise, c, u = _setup(batch=6)
    ag = AdaptiveGuidance(3.0, threshold=0.99)
    x, nfe = sample(model, noise, sch, N, guidance=ag, cond=c, uncond=u)
    steps = list(ag.switch_steps)
    assert len(set(steps)) > 1  # the samples switched at different steps
    assert nfe == 2 * (max(steps) + 1) + (N - max(steps) - 1)
    assert ag.sample_evals == pytest.approx(sum(2 * (s + 1) + (N - s - 1) for s in steps) / 6)
    for j in range(6):  # each sample as if sampled alone
        solo = AdaptiveGuidance(3.0, threshold=0.99)
        xj, _ = sample(model, noise[j:j + 1], sch, N, guidance=solo, cond=c[j:j + 1], uncond=u[j:j + 1])
        assert solo.switch_steps == [steps[j]]
        torch.testing.assert_close(x[j:j + 1], xj, rtol=0, atol=1e-12)


def test_ag_with_apg_composes():
    model, sch, noise, c, u = _setup(batch=4)
    apg_ref, _ = _traj(model, sch, noise, APG(4.0, momentum=-0.5), c, u)
    ag = AdaptiveGuidance(guidance=APG(4.0, momentum=-0.5), threshold=0.99, per_sample=False)
    xs, nfe = _traj(model, sch, noise, ag, c, u)
    k = ag.switch_steps[0]
    assert k is not None and nfe < 2 * N
    for i in range(k + 1):
        assert torch.equal(xs[i], apg_ref[i])


# ---------------------------------------------------------------------------------- CFG++
def test_cfgpp_ddim_lambda1_equals_ddim():
    model, sch, noise, c, _ = _setup(order=1)
    ddim, _ = sample(model, noise, sch, N, guidance=None, cond=c)
    x, nfe = sample(model, noise, sch, N, guidance=CFGPlusPlus(1.0), cond=c, uncond=c)
    assert nfe == 2 * N
    torch.testing.assert_close(x, ddim, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_cfgpp_ddim_matches_paper_update(pt):
    model, sch, noise, c, u = _setup(pt=pt, order=1, batch=6)
    lam = 0.6
    x, _ = sample(model, noise, sch, N, guidance=CFGPlusPlus(lam), cond=c, uncond=u)
    sch.set_timesteps(N)
    y = noise.clone()
    for i, t in enumerate(sch.timesteps):  # Chung et al. Algorithm 1 (DDIM, eta = 0)
        a, s = sch.alpha_sigma(i)
        a_n, s_n = sch.alpha_sigma(i + 1)
        _, eps_c = to_x0_eps(model(y, t, c), y, a, s, pt)
        _, eps_u = to_x0_eps(model(y, t, u), y, a, s, pt)
        eps_l = eps_u + lam * (eps_c - eps_u)
        x0 = (y - s * eps_l) / a
        y = a_n * x0 + s_n * eps_u
    torch.testing.assert_close(x, y, rtol=0, atol=1e-9)


def test_cfgpp_needs_a_renoising_scheduler():
    from diffusers import DDIMScheduler

    model, _, noise, c, u = _setup()
    with pytest.raises(ValueError, match="renoise"):
        sample(model, noise, DDIMScheduler(**SD), 4, guidance=CFGPlusPlus(0.5), cond=c, uncond=u)


# ---------------------------------------------------------------------------------- LinearAG
def test_linear_ag_fit_recovers_known_relation():
    model, sch, noise, c, u = _setup(batch=8)
    base = model

    def fake(x, t, cond):  # the unconditional x0 is exactly 0.5 * the conditional x0
        out = base(x, t, c)
        if cond is u:
            a, s = float(sch.schedule.alpha(float(t))), float(sch.schedule.sigma(float(t)))
            x0 = 0.5 * to_x0_eps(out, x, a, s, "v_prediction")[0]
            out = from_x0_eps(x0, (x - a * x0) / s, a, s, "v_prediction")
        return out

    fit = fit_linear_ag(fake, sch, noise, c, u, N, 3.0, start_step=5)
    assert fit["start_step"] == 5 and len(fit["coefficients"]) == N - 5
    for row in fit["coefficients"]:  # c_{i-1} and u_{i-1} = c_{i-1} / 2 are collinear: only b + d/2 is identified
        assert row[0] == pytest.approx(0.5, abs=1e-6) and row[1] + 0.5 * row[2] == pytest.approx(0.0, abs=1e-6)
    assert max(fit["rel_error"]) < 1e-6
    ref, _ = sample(fake, noise, sch, N, guidance=3.0, cond=c, uncond=u)
    x, nfe = sample(fake, noise, sch, N, guidance=LinearAG(fit), cond=c, uncond=u)
    assert nfe == 2 * 5 + (N - 5)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-8)


def test_linear_ag_estimate_formula():
    model, sch, noise, c, u = _setup(batch=4)
    table = {"num_steps": N, "start_step": 6, "space": "x0", "scale": 2.0,
             "coefficients": [[1.0, 0.0, 0.0]] * (N - 6)}  # u_hat = c: conditional-only after step 6
    x, nfe = sample(model, noise, sch, N, guidance=LinearAG(table), cond=c, uncond=u)
    assert nfe == 2 * 6 + N - 6
    sch.set_timesteps(N)
    y = noise.clone()
    for i, t in enumerate(sch.timesteps):
        oc = model(y, t, c)
        out = model(y, t, u) + 2.0 * (oc - model(y, t, u)) if i < 6 else oc
        y = sch.step(out, t, y, return_dict=False)[0]
    torch.testing.assert_close(x, y, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="steps"):
        sample(model, noise, sch, N + 1, guidance=LinearAG(table), cond=c, uncond=u)


# ---------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_name_the_argument():
    cases = [
        (lambda: CFG("7"), "scale"), (lambda: APG(-1.0), "scale"), (lambda: APG(3.0, space="latent"), "space"),
        (lambda: APG(3.0, norm_threshold=-1), "norm_threshold"), (lambda: APG(3.0, momentum=2.0), "momentum"),
        (lambda: CFGPlusPlus(-0.1), "scale"), (lambda: GuidanceRescale(1.5, scale=3.0), "phi"),
        (lambda: GuidanceRescale(0.5), "scale"), (lambda: AdaptiveGuidance(3.0, threshold=-2), "threshold"),
        (lambda: AdaptiveGuidance(guidance=CFGPlusPlus(0.5)), "guidance"),
        (lambda: AdaptiveGuidance(3.0, min_step=-1), "min_step"),
        (lambda: LinearAG({"num_steps": 4}), "coefficients"), (lambda: LinearAG("/nonexistent.json"), "coefficients"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


def test_cfg_scale_one_skips_the_unconditional_pass():
    """CFG(1) is the conditional model: one evaluation per step, same result as guidance=None."""
    import fewstep
    from fewstep.guidance import CFG
    from fewstep.samplers import DPMSolverPPScheduler
    from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

    sched = DPMSolverPPScheduler(prediction_type="v_prediction")
    model = GaussianMixtureModel(make_gaussian_mixture(dim=8, seed=4), sched.schedule, "v_prediction")
    noise = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    c = torch.arange(6) % 3
    x1, nfe1 = fewstep.sample(model, noise, sched, 7, guidance=CFG(1.0), cond=c, uncond=-1)
    x0, nfe0 = fewstep.sample(model, noise, sched, 7, cond=c)
    assert nfe1 == nfe0 == 7
    torch.testing.assert_close(x1, x0, rtol=0, atol=0)
    _, nfe2 = fewstep.sample(model, noise, sched, 7, guidance=CFG(2.0), cond=c, uncond=-1)
    assert nfe2 == 14
