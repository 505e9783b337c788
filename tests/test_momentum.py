"""MomentumScheduler (HB / GHVB / Nesterov momentum, Wizadwongsa et al. ICLR 2024).

Independent references: GHVB weights from polynomial exactness of the velocity recursion (not from
the paper's printed numbers); PLMS / variable-step Adams-Bashforth written out here in DDIM
variables; DPMSolverPPScheduler for HB(beta = 1) on 2M; float64 DOP853 solves of the exact Gaussian
mixture for the local and global orders; real tiny SD / SD3 pipelines end to end."""

import itertools
import math

import numpy as np
import pytest
import torch
from numpy.polynomial import polynomial as P

from fewstep import sample
from fewstep.guidance import APG, CFG, AdaptiveGuidance, CFGPlusPlus, GuidanceRescale, LinearAG
from fewstep.samplers import DPMSolverPPScheduler, MomentumScheduler
from fewstep.samplers.momentum import adams_bashforth_weights, ghvb_weights
from fewstep.schedule import from_x0_eps
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture, reference_solve

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
EDM = dict(schedule_kind="edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
MIX = make_gaussian_mixture(dim=16, seed=0)
SMOOTH = make_gaussian_mixture(dim=8, seed=1, var_range=(0.3, 1.0))
SMOOTH16 = make_gaussian_mixture(dim=16, seed=1, var_range=(0.05, 0.3))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _const_weights(c, beta=1.0):
    ab = adams_bashforth_weights(-np.arange(c, dtype=np.float64))
    return ghvb_weights(ab, beta)


# ------------------------------------------------------------------------------ the coefficients
def _steady_velocity(k, beta):
    """Coefficients of the polynomial ``V`` with ``V(n + 1) - (1 - beta) V(n) = beta n^k`` (the
    velocity of GHVB once the start-up transient has died out, for ``f(n) = n^k``)."""
    nodes = np.arange(k + 1, dtype=np.float64)
    a = np.array([[(n + 1) ** p - (1 - beta) * n**p for p in range(k + 1)] for n in nodes])
    return np.linalg.solve(a, beta * nodes**k)


def _exactness_matrix(c, beta, degrees):
    """Rows k: the velocities ``V_k(1), V_k(0), ..., V_k(2 - c)`` for ``f = n^k``; the step's exact
    mean of ``f`` over ``[0, 1]`` is ``1 / (k + 1)``."""
    return np.array([[P.polyval(1.0 - j, _steady_velocity(k, beta)) for j in range(c)] for k in degrees])


@pytest.mark.parametrize("beta", [1.0, 0.9, 0.8, 0.5, 0.2])
def test_ghvb_weights_are_the_unique_weights_exact_on_polynomials(beta):
    """Independent derivation: the r velocity weights that reproduce the step mean of every
    polynomial of degree < r through GHVB's velocity recursion are unique; fewstep's weights are
    them, and they are not exact for degree r (so the order is exactly r)."""
    for c in range(1, 6):
        a = np.linalg.solve(_exactness_matrix(c, beta, range(c)), 1.0 / (np.arange(c) + 1.0))
        np.testing.assert_allclose(_const_weights(c, beta), a, rtol=1e-9, atol=1e-9)
        high = _exactness_matrix(c, beta, [c])[0] @ a
        assert abs(high - 1.0 / (c + 1)) > 1e-3, (c, beta)
    # beta = 1 is Adams-Bashforth: the 4-step weights are the classical (55, -59, 37, -9) / 24
    if beta == 1.0:
        np.testing.assert_allclose(_const_weights(4) * 24, [55, -59, 37, -9], atol=1e-12)


def test_paper_order3_line_has_a_typo():
    """The paper prints v_{n+1} as the third term of the order-3 GHVB line; the official code (and
    the derivation) put it on v_{n-1}. The printed version is not exact for linear f."""
    beta = 0.6
    w = _const_weights(3, beta)
    np.testing.assert_allclose(w * 12 * beta, [18 + 5 * beta, -(24 - 8 * beta), 6 - beta], atol=1e-12)
    typo = np.array([w[0] + w[2], w[1], 0.0])
    lin = _exactness_matrix(3, beta, [1])[0]
    assert abs(lin @ w - 0.5) < 1e-12 and abs(lin @ typo - 0.5) > 0.1


def test_variable_step_weights_integrate_the_interpolant():
    """adams_bashforth_weights == the integral over [0, 1] of each Lagrange basis polynomial through
    the nodes (numpy polynomial arithmetic), on random non-uniform nodes."""
    rng = np.random.default_rng(0)
    for c in range(1, 6):
        nodes = np.concatenate([[0.0], -np.cumsum(rng.uniform(0.2, 3.0, c - 1))])
        ref = []
        for j in range(c):
            basis = np.array([1.0])
            for m in range(c):
                if m != j:
                    basis = P.polymul(basis, [-nodes[m], 1.0]) / (nodes[j] - nodes[m])
            integral = P.polyint(basis)
            ref.append(P.polyval(1.0, integral) - P.polyval(0.0, integral))
        np.testing.assert_allclose(adams_bashforth_weights(nodes), ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ reductions
class PLMSReference:
    """Plain Adams-Bashforth in DDIM variables (xbar = x / alpha, sbar = sigma / alpha, slope eps),
    written out independently: constant weights (PLMS) or weights from the actual sbar nodes
    (``variable=True``), lower orders while the history fills, on a scheduler's grid arrays."""

    def __init__(self, alphas, sigmas, order, variable):
        self.a, self.s, self.r, self.variable = alphas, sigmas, order, variable
        self.f, self.nodes = [], []

    def weights(self, i, c):
        sb = self.s / self.a
        u = (-np.arange(c) if not self.variable else (np.array(self.nodes[:c]) - sb[i]) / (sb[i + 1] - sb[i]))
        mom = np.vander(u, c, increasing=True).T
        return np.linalg.solve(mom, 1.0 / np.arange(1, c + 1))

    def step(self, i, x, eps, x0):
        a, s, a1, s1 = self.a[i], self.s[i], self.a[i + 1], self.s[i + 1]
        self.f.insert(0, eps)
        self.nodes.insert(0, s / a if a > 0 else np.inf)
        c = min(self.r, len(self.f))
        if self.variable:
            c = min(c, sum(1 for v in itertools.takewhile(np.isfinite, self.nodes)))
        e = sum(w * f for w, f in zip(self.weights(i, c), self.f))
        if a == 0:  # flow matching at sigma = 1: the first (Euler) step, e = eps
            return a1 * x0 + s1 * e
        return a1 * (x / a + (s1 / a1 - s / a) * e)


def _eps_x0(out, x, a, s, ptype):
    """eps and x0 of a raw output, written out per prediction type (VP and flow)."""
    if ptype == "epsilon":
        return out, (x - s * out) / a
    if ptype == "v_prediction":
        return a * out + s * x, a * x - s * out
    return out + (x - s * out), x - s * out  # flow: u = eps - x0, x = (1 - s) x0 + s eps


@pytest.mark.parametrize("cfg,n", [(dict(SD, timestep_spacing="trailing"), 9),
                                   (dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 8),
                                   (FLOW, 7)])
@pytest.mark.parametrize("variable", [False, True])
def test_integer_momentum_number_is_adams_bashforth(cfg, n, variable):
    """beta = 1: GHVB r, HB r and Nesterov r are Adams-Bashforth / PLMS of order r (paper Sec. 4),
    step by step, in float64, driven with the same model outputs as the reference."""
    ptype = cfg.get("prediction_type", "epsilon")
    for r, method in itertools.product(range(1, 6), ["ghvb", "hb", "nesterov"]):
        ours = MomentumScheduler(**cfg, method=method, momentum_number=r, base="ab" if variable else "plms")
        ours.set_timesteps(n)
        ref = PLMSReference(ours._alphas, ours._sigmas, r, variable)
        model = GaussianMixtureModel(MIX, ours.schedule, ptype)
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for i, t in enumerate(ours.timesteps):
            out = model(x, t)
            eps, x0 = _eps_x0(out, x, ours._alphas[i], ours._sigmas[i], "flow" if ptype == "flow_prediction" else ptype)
            want = ref.step(i, x, eps, x0)
            got = ours.step(out, t, x).prev_sample
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{method} r={r} step {i}")
            x = want


def test_variable_step_base_is_plms_on_grids_uniform_in_sbar():
    """base='ab' takes its weights from the grid; on a grid uniform in sbar they are PLMS's."""
    uniform = list(np.linspace(6.0, 0.0, 13))
    model = GaussianMixtureModel(MIX, MomentumScheduler(**SD).schedule, "epsilon")
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for m in (3.8, 2.5):
        a = sample(model, z, MomentumScheduler(**SD, momentum_number=m, round_timesteps=False), sigmas=uniform)[0]
        b = sample(model, z, MomentumScheduler(**SD, momentum_number=m, base="ab", round_timesteps=False),
                   sigmas=uniform)[0]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        c = sample(model, z, MomentumScheduler(**SD, momentum_number=m, timestep_spacing="trailing"), 12)[0]
        d = sample(model, z, MomentumScheduler(**SD, momentum_number=m, base="ab", timestep_spacing="trailing"), 12)[0]
        assert (c - d).abs().max() > 1e-4  # the premise: SD's trailing grid is not uniform in sbar


def _lockstep_dpmpp(cfg, n, dtype, beta=1.0):
    ours = MomentumScheduler(**cfg, method="hb", base="dpmpp", beta=beta)
    ref = DPMSolverPPScheduler(**cfg, solver_order=2)
    model = GaussianMixtureModel(MIX, ours.schedule, cfg.get("prediction_type", "epsilon"))
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=dtype)
    worst = 0.0
    for t in ref.timesteps:
        out = model(x, t)
        a = ref.step(out, t, x).prev_sample
        worst = max(worst, (ours.step(out, t, x).prev_sample - a).abs().max().item())
        x = a
    return worst


GRIDS = [{}, {"use_karras_sigmas": True}, {"use_lu_lambdas": True}, {"timestep_spacing": "trailing"},
         {"final_sigmas_type": "sigma_min", "timestep_spacing": "logsnr", "round_timesteps": False}]


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_hb_beta_one_on_dpmpp_is_dpm_solver_pp_2m(ptype):
    """HB(beta = 1) on DPM-Solver++ is DPMSolverPPScheduler 2M step by step (including its order
    rules for few steps: n = 6 and 16 around lower_order_final's threshold)."""
    for grid, n in itertools.product(GRIDS, [6, 16]):
        cfg = dict(SD, prediction_type=ptype, **grid)
        assert _lockstep_dpmpp(cfg, n, torch.float64) < 1e-12, (grid, n)
        assert _lockstep_dpmpp(cfg, n, torch.float32) < 2e-6, (grid, n)
    assert _lockstep_dpmpp(dict(SD, prediction_type=ptype), 10, torch.float64, beta=0.8) > 1e-3  # the premise


# ------------------------------------------------------------------------------ orders
_PATHS = {}


def _exact_path(sbar):
    """The exact VE states of SMOOTH's probability-flow ODE at every ``sbar`` (float64 DOP853,
    chained between consecutive points), from a fixed start at ``sbar[0]``."""
    key = tuple(np.round(sbar, 12))
    if key not in _PATHS:
        ys = [torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)]
        for s0, s1 in zip(sbar[:-1], sbar[1:]):
            ys.append(reference_solve(SMOOTH, ys[-1], s0, s1))
        _PATHS[key] = ys
    return _PATHS[key]


def _local_error(h, geometric=False, lead=40, s_star=1.0, **kw):
    """Relative error of one step from ``sbar = s_star`` of size ``h`` when the scheduler has been
    fed the exact solution and exact model outputs at the ``lead`` points before it (so velocities
    have forgotten their start): the local truncation error, O(h^(p+1)) for a method of order p."""
    k = np.arange(lead, -2, -1, dtype=np.float64)
    sbar = s_star * (1 + h / s_star) ** k if geometric else s_star + h * k
    ys = _exact_path(sbar)
    sch = MomentumScheduler(prediction_type="epsilon", round_timesteps=False, **kw)
    sch.set_timesteps(sigmas=list(sbar))
    model = GaussianMixtureModel(SMOOTH, sch.schedule, "epsilon")
    for j in range(lead + 1):
        x = ys[j] * float(sch._alphas[j])
        nxt = sch.step(model(x, sch.timesteps[j]), sch.timesteps[j], x).prev_sample
    return ((nxt / float(sch._alphas[lead + 1]) - ys[lead + 1]).norm() / ys[lead + 1].norm()).item()


def _slope(errs, hs):
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


HS = (0.08, 0.04, 0.02)


@pytest.mark.parametrize("kw,p", [
    (dict(momentum_number=1), 1), (dict(momentum_number=2), 2), (dict(momentum_number=3), 3),
    (dict(momentum_number=4), 4), (dict(momentum_number=2.5), 3), (dict(momentum_number=3.2), 4),
    (dict(momentum_number=3.8), 4),
    # heavy ball and Nesterov with beta < 1: first order (Theorem 1)
    (dict(method="hb", momentum_number=3.8), 1), (dict(method="hb", momentum_number=1.5), 1),
    (dict(method="nesterov", momentum_number=3.8), 1),
    (dict(method="hb", momentum_number=4), 4),  # beta = 1: PLMS4
])
def test_local_error_order_on_exact_mixture(kw, p):
    """Theorem 2: GHVB of order r (any beta) has local error O(h^(r+1)); Theorem 1: HB with
    beta < 1 has O(h^2), i.e. first order. Grid uniform in sbar (the paper's setting)."""
    slope = _slope([_local_error(h, **kw) for h in HS], HS)
    assert p + 1 - 0.35 < slope < p + 1 + 0.5, (kw, slope)


def test_variable_step_base_keeps_the_order_on_non_uniform_grids():
    """On a geometric sbar grid (like Karras / logSNR grids) PLMS's constant weights fall to second
    order (local error h^3); base='ab' keeps order 4 with and without momentum."""
    plms = _slope([_local_error(h, geometric=True, momentum_number=4) for h in HS], HS)
    ab = _slope([_local_error(h, geometric=True, momentum_number=4, base="ab") for h in HS], HS)
    ghvb = _slope([_local_error(h, geometric=True, momentum_number=3.8, base="ab") for h in HS], HS)
    assert 2.6 < plms < 3.4 and ab > 4.6 and ghvb > 4.6, (plms, ab, ghvb)


def test_global_error_on_exact_mixture():
    """End to end against the exact ODE endpoint (sigma = 0) on a grid uniform in sbar: GHVB 1 and 2
    converge at orders 1 and 2, GHVB 3.8 is far more accurate than GHVB 2, HB 3.8 first order;
    HB on DPM-Solver++ with beta = 0.8 is first order where beta = 1 (2M) is second order."""
    s0, nfes = 10.0, (50, 100, 200)
    z = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a0 = 1 / math.sqrt(1 + s0**2)
    ref = reference_solve(SMOOTH, z / a0, s0, 0.0)

    def errs(grid, **kw):
        sch = MomentumScheduler(prediction_type="epsilon", round_timesteps=False, **kw)
        model = GaussianMixtureModel(SMOOTH, sch.schedule, "epsilon")
        out = []
        for n in nfes:
            x = sample(model, z, sch, sigmas=list(grid(n)))[0]
            out.append(((x - ref).norm() / ref.norm()).item())
        return out

    uniform = lambda n: np.linspace(s0, 0.0, n + 1)  # noqa: E731
    e1, e2 = errs(uniform, momentum_number=1), errs(uniform, momentum_number=2)
    e38, hb = errs(uniform, momentum_number=3.8), errs(uniform, method="hb", momentum_number=3.8)
    assert 0.85 < -_slope(e1, nfes) < 1.15 and 1.85 < -_slope(e2, nfes) < 2.15, (e1, e2)
    assert all(a < 0.1 * b for a, b in zip(e38, e2)) and e38[-1] < 0.03 * e2[-1], (e38, e2)
    assert 0.8 < -_slope(hb, nfes) < 1.2, hb
    # DPM-Solver++ on its own logSNR grid down to sigma_min (no first-order jump to sigma = 0)
    dpm_errs = {}
    for beta in (1.0, 0.8):
        sch = MomentumScheduler(prediction_type="v_prediction", method="hb", base="dpmpp", beta=beta,
                                timestep_spacing="logsnr", final_sigmas_type="sigma_min", round_timesteps=False)
        model = GaussianMixtureModel(SMOOTH, sch.schedule, "v_prediction")
        sch.set_timesteps(nfes[0])
        (a_0, s_0), (a_1, s_1) = sch.alpha_sigma(0), sch.alpha_sigma(nfes[0])
        end = reference_solve(SMOOTH, z / a_0, s_0 / a_0, s_1 / a_1) * a_1
        dpm_errs[beta] = [((sample(model, z, sch, n)[0] - end).norm() / end.norm()).item() for n in nfes]
    assert -_slope(dpm_errs[1.0], nfes) > 1.7 and 0.8 < -_slope(dpm_errs[0.8], nfes) < 1.3, dpm_errs


# ------------------------------------------------------------------------------ model kinds
class EDMModel:
    """The exact EDM-preconditioned network of SMOOTH16 (Karras et al. 2022, Table 1): called with
    ``c_in x`` and ``c_noise = log(sigma) / 4``, returns ``F``."""

    def __init__(self, prediction_type, sigma_data=0.5):
        self.pt, self.sd = prediction_type, sigma_data

    def __call__(self, x_in, c_noise, c=None):
        sigma = math.exp(4.0 * float(c_noise))
        x = x_in * math.sqrt(sigma**2 + self.sd**2)
        x0 = SMOOTH16.denoise_ve(x, sigma, c).to(x.dtype)
        return from_x0_eps(x0, (x - x0) / sigma, 1.0, sigma, self.pt, sigma_data=self.sd)


KINDS = {
    "eps": (dict(SD, timestep_spacing="trailing"), None),
    "v": (dict(SD, prediction_type="v_prediction", use_karras_sigmas=True), None),
    "x0": (dict(SD, prediction_type="sample"), None),
    "cosine v": (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                      timestep_spacing="trailing"), None),
    "flow": (FLOW, None),
    "edm eps": (EDM, EDMModel("epsilon")),
    "edm v": (dict(EDM, prediction_type="v_prediction"), EDMModel("v_prediction")),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_model_kind(kind):
    """eps / v / x0 / flow / EDM: GHVB 1 is DDIM (= DPM-Solver++ order 1) exactly, and GHVB 3.8 (both
    bases) and HB on DPM-Solver++ converge to the end point of a 400-step DPM-Solver++ 2M."""
    cfg, edm_model = KINDS[kind]
    cfg = dict(cfg, final_sigmas_type="sigma_min")  # no first-order jump to sigma = 0: one common end point
    sch = MomentumScheduler(**cfg)
    model = edm_model or GaussianMixtureModel(SMOOTH16, sch.schedule, cfg.get("prediction_type", "epsilon"))
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(s, n):
        return sample(model, z, s, n)[0]

    ddim = run(DPMSolverPPScheduler(**cfg, solver_order=1), 12)
    torch.testing.assert_close(run(MomentumScheduler(**cfg, momentum_number=1), 12), ddim, rtol=1e-9, atol=1e-9)
    ref = run(DPMSolverPPScheduler(**cfg, solver_order=2), 400)
    for kw in (dict(momentum_number=3.8), dict(momentum_number=3.8, base="ab"),
               dict(method="hb", base="dpmpp", beta=0.8)):
        e = [((run(MomentumScheduler(**cfg, **kw), n) - ref).norm() / ref.norm()).item() for n in (15, 60)]
        assert e[1] < 0.5 * e[0] and e[1] < (0.04 if kw.get("method") == "hb" else 0.015), (kind, kw, e)


# ------------------------------------------------------------------------------ guidance
def _guided(sch, g, steps=10):
    model = GaussianMixtureModel(MIX, sch.schedule, sch.config.prediction_type)
    noise = torch.randn(12, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    c, u = torch.arange(12) % 3, torch.full((12,), -1)
    return sample(model, noise, sch, steps, guidance=g, cond=c, uncond=u)


def _rules():
    return [CFG(5.0), APG(5.0, eta=0.0, momentum=-0.5, norm_threshold=2.0), GuidanceRescale(0.7, scale=5.0),
            AdaptiveGuidance(5.0, threshold=0.99), CFGPlusPlus(0.6),
            LinearAG({"num_steps": 10, "start_step": 10, "space": "x0", "scale": 5.0, "coefficients": []})]


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_momentum_composes_with_every_guidance_rule(ptype):
    """Through fewstep.sample with guidance objects (CFG, APG, rescale, AG, CFG++, LinearAG): the
    beta = 1 members equal DPM-Solver++ under the same rule (GHVB 1 = DDIM, HB on 2M = 2M), the
    momentum members run finite with the same evaluation count, and a CFG object equals the number."""
    cfg = dict(SD, prediction_type=ptype, timestep_spacing="trailing")
    for g in _rules():
        name = type(g).__name__
        x1, n1 = _guided(MomentumScheduler(**cfg, momentum_number=1), g)
        r1, m1 = _guided(DPMSolverPPScheduler(**cfg, solver_order=1), g)
        torch.testing.assert_close(x1, r1, rtol=1e-9, atol=1e-9, msg=name)
        x2, _ = _guided(MomentumScheduler(**cfg, method="hb", base="dpmpp", beta=1.0), g)
        r2, _ = _guided(DPMSolverPPScheduler(**cfg, solver_order=2), g)
        torch.testing.assert_close(x2, r2, rtol=1e-9, atol=1e-9, msg=name)
        for kw in (dict(momentum_number=3.8), dict(momentum_number=2.5, base="ab"),
                   dict(method="hb", base="dpmpp", beta=0.8), dict(method="nesterov", momentum_number=3.9)):
            x, n = _guided(MomentumScheduler(**cfg, **kw), g)
            assert torch.isfinite(x).all() and n == n1 == m1, (name, kw)
            assert (x - r2).abs().max() > 1e-6, (name, kw)  # momentum changed the result
    a = _guided(MomentumScheduler(**cfg, momentum_number=3.5), CFG(5.0))[0]
    b = _guided(MomentumScheduler(**cfg, momentum_number=3.5), 5.0)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def tiny():
    from tiny_pipelines import tiny_sd, tiny_sd3, tiny_sd_img2img

    return {"sd": tiny_sd(), "sd3": tiny_sd3(), "img2img": tiny_sd_img2img()}


def _pipe_latents(pipe, scheduler, kwargs, steps=6):
    shipped = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        return pipe(**kwargs, num_inference_steps=steps, guidance_scale=7.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images
    finally:
        pipe.scheduler = shipped


@pytest.mark.parametrize("which", ["sd", "sd3", "img2img"])
def test_tiny_pipelines_end_to_end(tiny, which):
    """A tiny SD, SD3 (flow matching) and SD img2img (begin index) pipeline with the scheduler
    swapped in via from_config(pipe.scheduler.config, ...): GHVB 1 reproduces DDIM (DPM-Solver++ 1)
    and HB(beta = 1) reproduces 2M; GHVB 3.8 and HB 0.8 run and differ from them."""
    from tiny_pipelines import sd3_inputs, sd_img2img_inputs, sd_inputs

    pipe = tiny[which]
    kwargs = {"sd": sd_inputs, "sd3": sd3_inputs, "img2img": sd_img2img_inputs}[which]()
    cfg = pipe.scheduler.config
    with torch.no_grad():
        ddim = _pipe_latents(pipe, DPMSolverPPScheduler.from_config(cfg, solver_order=1), kwargs)
        g1 = _pipe_latents(pipe, MomentumScheduler.from_config(cfg, momentum_number=1), kwargs)
        torch.testing.assert_close(g1, ddim, rtol=1e-4, atol=1e-4)
        two = _pipe_latents(pipe, DPMSolverPPScheduler.from_config(cfg, solver_order=2), kwargs)
        hb1 = _pipe_latents(pipe, MomentumScheduler.from_config(cfg, method="hb", base="dpmpp", beta=1.0), kwargs)
        torch.testing.assert_close(hb1, two, rtol=1e-4, atol=1e-4)
        for kw in (dict(momentum_number=3.8), dict(method="hb", base="dpmpp", beta=0.8)):
            sch = MomentumScheduler.from_config(cfg, **kw)
            if which == "sd3":
                assert sch.schedule.kind == "flow"
            lat = _pipe_latents(pipe, sch, kwargs)
            assert torch.isfinite(lat).all() and (lat - ddim).abs().max() > 1e-4, kw


def test_save_load_and_from_config(tmp_path):
    s = MomentumScheduler.from_config(dict(SD, steps_offset=1, _class_name="PNDMScheduler", skip_prk_steps=True),
                                      method="hb", base="dpmpp", beta=0.7)
    assert (s.momentum_base, s.momentum_order, s.momentum_beta) == ("dpmpp", 2, 0.7)
    assert s.config.beta_schedule == "scaled_linear" and s.order == 1 and "PNDMScheduler" in s._compatibles
    s.save_pretrained(tmp_path)
    s2 = MomentumScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(s2.config) == public(s.config) and s2.momentum_beta == 0.7
    # another scheduler's `method` does not leak in; a new method drops the old method's settings
    d = MomentumScheduler.from_config(DPMSolverPPScheduler(method="singlestep").config, momentum_number=2.5)
    assert d.config.method == "ghvb" and (d.momentum_order, d.momentum_beta) == (3, 0.5)
    g = MomentumScheduler.from_config(s.config, method="ghvb", momentum_number=3.5)
    assert g.momentum_base == "plms" and (g.momentum_order, g.momentum_beta) == (4, 0.5)
    same = MomentumScheduler.from_config(s.config, beta=0.9)
    assert (same.momentum_base, same.momentum_beta) == ("dpmpp", 0.9)
    assert MomentumScheduler(momentum_number=4, beta=0.8).momentum_beta == 0.8  # = 3.8
    edm = MomentumScheduler.from_config(DPMSolverPPScheduler(**EDM).config)
    assert edm.schedule.kind == "edm" and edm.init_noise_sigma == 80.0


def test_bad_inputs_raise_clear_errors():
    cases = [
        (dict(beta=0.0), "beta=0.0.*\\(0, 1\\]"), (dict(beta=1.5), "beta=1.5"), (dict(beta=True), "beta=True"),
        (dict(beta="0.5"), "beta='0.5'"), (dict(momentum_number=0), "momentum_number=0.*\\(0, 5\\]"),
        (dict(momentum_number=5.5), "momentum_number=5.5"), (dict(momentum_number=float("nan")), "momentum_number"),
        (dict(method="adam"), "method='adam'.*'ghvb', 'hb', 'nesterov'"),
        (dict(base="ddim"), "base='ddim'.*'plms', 'ab', 'dpmpp'"),
        (dict(method="ghvb", base="dpmpp"), "base='dpmpp'.*method='ghvb'"),
        (dict(method="hb", base="dpmpp", momentum_number=3.8), "momentum_number=3.8.*\\(0, 2\\]"),
        (dict(momentum_number=3.8, beta=0.5), "contradicts beta=0.5"),
        (dict(solver_order=2), "solver_order"),
    ]
    for kw, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            MomentumScheduler(**kw)


def test_from_config_explicit_momentum_number_replaces_the_inherited_beta():
    """Switching a heavy-ball config (beta 0.8) to ``momentum_number=3.5`` used to raise (3.5 says
    beta 0.5, the inherited config said 0.8): the explicit number carries its own beta."""
    hb = MomentumScheduler(method="hb", base="plms", beta=0.8)
    s = MomentumScheduler.from_config(hb.config, method="ghvb", momentum_number=3.5)
    assert (s.momentum_order, s.momentum_beta) == (4, 0.5)
    s = MomentumScheduler.from_config(hb.config, momentum_number=3.5)  # same method (hb), new number
    assert (s.config.method, s.momentum_order, s.momentum_beta) == ("hb", 4, 0.5)
    with pytest.raises(ValueError, match="contradicts beta"):
        MomentumScheduler.from_config(hb.config, momentum_number=3.5, beta=0.8)


def test_registry_short_names_build_momentum_and_take_overrides(tmp_path):
    """``ghvb``, ``hb-dpmpp``, ``hb-plms4`` and ``ghvb-ab-karras`` build the intended momentum
    schedulers on a pipeline's own config; ``--scheduler-config momentum_number=3.8`` reaches GHVB,
    and the CLI samples with it."""
    import json

    from fewstep.apps.cli import main
    from fewstep.samplers.registry import make_scheduler

    base = DPMSolverPPScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config
    cases = {"ghvb": ("ghvb", "plms", 3, 0.5), "hb-dpmpp": ("hb", "dpmpp", 2, 0.8),
             "hb-plms4": ("hb", "plms", 4, 0.8), "ghvb-ab-karras": ("ghvb", "ab", 4, 0.5)}
    for name, (method, mbase, order, beta) in cases.items():
        s = make_scheduler(name, base)
        assert (s.config.method, s.momentum_base, s.momentum_order, s.momentum_beta) == (method, mbase, order, beta)
        assert s.config.prediction_type == "v_prediction"
    s = make_scheduler("ghvb", base, {"momentum_number": 3.8})
    assert (s.momentum_order, s.momentum_beta) == (4, pytest.approx(0.8))
    s = make_scheduler("hb-dpmpp", make_scheduler("ghvb", base).config)  # no leak from the previous preset
    assert (s.config.method, s.momentum_base, s.momentum_beta) == ("hb", "dpmpp", 0.8)
    out = tmp_path / "ghvb"
    rc = main(["sample", "--model", "digits", "--scheduler", "ghvb", "--scheduler-config", "momentum_number=3.8",
               "--steps", "6", "--guidance", "cfg:5", "--labels", "3,7", "--n", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    record = json.loads((out / "record.json").read_text())
    assert record["settings"]["scheduler"] == "ghvb" and record["nfe"] == 12
