"""DPMSolverPPScheduler on EDM / VE models (Karras et al. 2022): step-by-step parity with diffusers'
``EDMDPMSolverMultistepScheduler``, the Table 1 preconditioning, config round trips, bad input and
the convergence order on an exact EDM-preconditioned Gaussian-mixture denoiser."""

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from fewstep import sample
from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler
from fewstep.schedule import edm_preconditioning, from_x0_eps, to_x0_eps
from fewstep.testing import make_gaussian_mixture, reference_solve

MIX = make_gaussian_mixture(dim=64, seed=0)
SMOOTH_MIX = make_gaussian_mixture(dim=16, seed=1, var_range=(0.05, 0.3))
COSXL = dict(sigma_data=1.0, sigma_min=0.002, sigma_max=120.0, sigma_schedule="exponential",
             prediction_type="v_prediction")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


class EDMMixtureModel:
    """The exact EDM-preconditioned network of a Gaussian mixture, written out from Karras et al.
    2022, Eq. 7 / Table 1 independently of fewstep's conversion code: called as
    ``F(c_in x, c_noise)`` it returns ``(D(x; sigma) - c_skip x) / c_out`` with ``D`` the exact
    posterior mean, ``sigma = exp(4 c_noise)`` and ``c_out``'s sign given by ``prediction_type``
    (``epsilon``: +, ``v_prediction``: -, diffusers' convention)."""

    def __init__(self, mixture, sigma_data=0.5, prediction_type="epsilon"):
        self.mixture, self.sd, self.sign = mixture, sigma_data, 1.0 if prediction_type == "epsilon" else -1.0
        self.nfe = 0

    def __call__(self, x_in, c_noise, c=None):
        self.nfe += 1
        sigma = math.exp(4.0 * float(c_noise))
        norm = math.sqrt(sigma**2 + self.sd**2)
        x = x_in.double().reshape(x_in.shape[0], -1) * norm  # undo c_in = 1 / norm
        d = self.mixture.denoise_ve(x, sigma, c)
        c_skip, c_out = self.sd**2 / norm**2, self.sign * sigma * self.sd / norm
        return ((d - c_skip * x) / c_out).reshape(x_in.shape).to(x_in.dtype)


def _c_in(sigma, sd):
    return 1.0 / math.sqrt(float(sigma) ** 2 + sd**2)


def _lockstep(cfg, n, begin_index=None):
    """Drive diffusers' EDM scheduler and ours (built by ``from_config`` of diffusers' config) with the
    same model outputs, computed on diffusers' states; a third copy of ours runs in float64.

    Returns ``(scaled, final, raw, floor)``: the max abs difference of the states in the network's
    units (``c_in x``, what ``scale_model_input`` returns: O(1) at every noise level, where raw
    EDM states are O(sigma_max)), including the model inputs themselves; the difference of the
    final sample (data units); the max raw difference; and diffusers' own float32 error against
    the float64 run (the float32 noise floor at sigma ~ 80, where one ulp of a state is ~1e-5).
    """
    ref = EDMDPMSolverMultistepScheduler(**cfg)
    ours, ours64 = DPMSolverPPScheduler.from_config(ref.config), DPMSolverPPScheduler.from_config(ref.config)
    for s in (ref, ours, ours64):
        s.set_timesteps(n)
        if begin_index is not None:
            s.set_begin_index(begin_index)
    assert ours.schedule.kind == "edm"
    sd = ref.config.sigma_data
    start = begin_index or 0
    x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * float(ref.sigmas[start])
    gens = [torch.Generator().manual_seed(1) for _ in range(3)]
    model = EDMMixtureModel(MIX, sd, ref.config.prediction_type)
    scaled = raw = floor = 0.0
    for i, (t_ref, t_ours) in enumerate(zip(ref.timesteps[start:], ours.timesteps[start:]), start):
        xin_ref, xin_ours = ref.scale_model_input(x, t_ref), ours.scale_model_input(x, t_ours)
        ours64.scale_model_input(x.double(), t_ours)
        assert xin_ours.dtype == x.dtype
        scaled = max(scaled, (xin_ref - xin_ours).abs().max().item())
        out = model(xin_ref, t_ref)
        a = ref.step(out, t_ref, x, generator=gens[0]).prev_sample
        b = ours.step(out, t_ours, x, generator=gens[1]).prev_sample
        c = ours64.step(out.double(), t_ours, x.double(), generator=gens[2]).prev_sample
        assert b.dtype == a.dtype and c.dtype == torch.float64
        scaled = max(scaled, (a - b).abs().max().item() * _c_in(ref.sigmas[i + 1], sd))
        raw = max(raw, (a - b).abs().max().item())
        floor = max(floor, (a.double() - c).abs().max().item())
        x = a
    assert ours.step_index == len(ours.timesteps)
    return scaled, (a - b).abs().max().item(), raw, floor


def _check(cfg, n, **kw):
    scaled, final, raw, floor = _lockstep(cfg, n, **kw)
    assert scaled < 1e-5 and final < 1e-5, (cfg, n, scaled, final)
    # raw states at sigma ~ 80: as close to diffusers as diffusers' float32 run is to float64
    assert raw <= max(1e-5, 2 * floor), (cfg, n, raw, floor)
    return scaled, final, raw


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
def test_step_parity_with_diffusers_edm(ptype, algo):
    """Orders 1-3 (diffusers' EDM scheduler has no SDE 3M: it raises UnboundLocalError), midpoint and
    heun, Karras and exponential grids, 6 steps (lower orders at the end) and 15 (full order),
    ODE and SDE with the same generator noise."""
    orders = [1, 2, 3] if algo == "dpmsolver++" else [1, 2]
    for order, stype, grid, n in itertools.product(orders, ["midpoint", "heun"], ["karras", "exponential"], [6, 15]):
        cfg = dict(prediction_type=ptype, algorithm_type=algo, solver_order=order, solver_type=stype,
                   sigma_schedule=grid)
        _check(cfg, n)


@pytest.mark.parametrize(
    "cfg",
    [
        COSXL,  # sigma_data = 1, v-prediction, exponential grid up to sigma = 120
        dict(sigma_min=0.02, sigma_max=20.0, sigma_data=0.7, rho=5.0, solver_order=3),
        dict(solver_order=3, lower_order_final=False),
        dict(solver_order=2, euler_at_final=True, algorithm_type="sde-dpmsolver++"),
        dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
    ],
)
def test_step_parity_with_diffusers_edm_other_configs(cfg):
    for n in (5, 16):
        _check(cfg, n)


def test_img2img_begin_index_and_add_noise_match_diffusers():
    cfg = dict(solver_order=2)
    _check(cfg, 12, begin_index=4)
    ref = EDMDPMSolverMultistepScheduler(**cfg)
    ours = DPMSolverPPScheduler.from_config(ref.config)
    x0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    for s in (ref, ours):
        s.set_timesteps(10)
    t = ref.timesteps[3:4].repeat(2)
    torch.testing.assert_close(ours.add_noise(x0, z, ours.timesteps[3:4].repeat(2)), ref.add_noise(x0, z, t),
                               rtol=2e-6, atol=1e-6)
    # off the grid: the timestep is read as c_noise, i.e. sigma = exp(4 t)
    off = torch.tensor([0.25 * math.log(3.0)])
    torch.testing.assert_close(ours.add_noise(x0, z, off), x0 + 3.0 * z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_timesteps_and_sigmas_match_diffusers(grid):
    """sigmas and timesteps (= c_noise = log(sigma)/4, Table 1) equal diffusers' up to diffusers' own
    float32 rounding of Eq. 5 (its float32 ``**rho`` is off by up to ~1e-6 relative; ours are the
    float64 values rounded once)."""
    for cfg in (dict(sigma_schedule=grid), dict(COSXL, sigma_schedule=grid)):
        ref = EDMDPMSolverMultistepScheduler(**cfg)
        ours = DPMSolverPPScheduler.from_config(ref.config)
        # before set_timesteps: the grid of num_train_timesteps points, like diffusers
        assert len(ours.timesteps) == len(ref.timesteps) == 1000
        torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1e-6)
        for n in (2, 3, 8, 25, 50):
            ref.set_timesteps(n)
            ours.set_timesteps(n)
            assert ours.timesteps.dtype == torch.float32 and ours.sigmas.dtype == torch.float32
            assert len(ours.sigmas) == n + 1 and float(ours.sigmas[-1]) == 0.0
            torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-6, atol=0)
            torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1e-6)
            torch.testing.assert_close(ours.timesteps.double(), 0.25 * torch.log(ours.sigmas[:-1].double()),
                                       rtol=0, atol=1e-6)
            # end points are exactly the configured range
            assert math.isclose(float(ours.sigmas[0]), ref.config.sigma_max, rel_tol=1e-7)
            assert math.isclose(float(ours.sigmas[-2]), ref.config.sigma_min, rel_tol=1e-7)


def test_one_step_grid_starts_at_sigma_max():
    """diffusers' exponential grid with one step is ``linspace(log sigma_min, log sigma_max, 1)``
    = [sigma_min] (a one-step sample then starts from almost no noise); ours starts at sigma_max,
    as its Karras grid does."""
    for grid in ("karras", "exponential"):
        s = DPMSolverPPScheduler.from_config(EDMDPMSolverMultistepScheduler(sigma_schedule=grid).config)
        s.set_timesteps(1)
        assert s.sigmas.tolist() == [80.0, 0.0]


def test_model_input_init_noise_and_explicit_grids():
    ref = EDMDPMSolverMultistepScheduler()
    s = DPMSolverPPScheduler.from_config(ref.config)
    # Karras et al. Alg. 1-2: x_T ~ N(0, sigma_max^2 I); diffusers uses sqrt(sigma_max^2 + 1)
    assert s.init_noise_sigma == 80.0 and abs(ref.init_noise_sigma - math.sqrt(80.0**2 + 1)) < 1e-12
    s.set_timesteps(7)
    x = torch.randn(3, 5, dtype=torch.float16)
    # scale_model_input locates the step from the timestep, like diffusers' EDM schedulers
    t3 = s.timesteps[3]
    y = s.scale_model_input(x, t3)
    assert s.step_index == 3 and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), (x.float() / math.sqrt(float(s.sigmas[3]) ** 2 + 0.25)).half().float())
    # explicit grids: c_noise timesteps (as scheduler.timesteps holds them) and sigmas give the same grid
    ts, sig = s.timesteps.clone(), s.sigmas.clone()
    s.set_timesteps(timesteps=ts.tolist())
    torch.testing.assert_close(s.sigmas, sig, rtol=1e-6, atol=0)
    torch.testing.assert_close(s.timesteps, ts)
    s.set_timesteps(sigmas=sig[:-1].tolist())
    torch.testing.assert_close(s.timesteps, ts)
    # final_sigmas_type="sigma_min": n steps that end on sigma_min, no zero-length last step
    m = DPMSolverPPScheduler.from_config(EDMDPMSolverMultistepScheduler(final_sigmas_type="sigma_min").config)
    m.set_timesteps(10)
    assert len(m.timesteps) == 10 and math.isclose(float(m.sigmas[-1]), 0.002, rel_tol=1e-6)
    assert torch.all(torch.diff(m.sigmas) < 0)
    # at >= 15 steps the last step is full order; diffusers' zero-length last step (h = 0) gives NaN
    # there for heun 2M and for 3M, ours stays finite
    for order, stype in [(2, "heun"), (3, "midpoint"), (3, "heun")]:
        m = DPMSolverPPScheduler.from_config(EDMDPMSolverMultistepScheduler(
            final_sigmas_type="sigma_min", solver_order=order, solver_type=stype).config)
        x, _ = sample(EDMMixtureModel(MIX), torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), m, 20)
        assert torch.isfinite(x).all() and x.abs().max() < 5


def test_conversion_is_table_1_and_its_inverse():
    """to_x0_eps(sigma_data=...) is D = c_skip x + c_out F (Karras Eq. 7, Table 1), from_x0_eps its
    inverse; EDM v_prediction is Salimans & Ho's v of the VP state c_in x for data x0 / sigma_data."""
    g = torch.Generator().manual_seed(0)
    x0, eps, f = (torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
    for sd, ptype in itertools.product([0.5, 1.3], ["epsilon", "v_prediction"]):
        x = x0 + sigma[:, None] * eps
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sd, ptype)
        sign = 1 if ptype == "epsilon" else -1
        torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
        torch.testing.assert_close(c_out, sign * sigma * sd / (sigma**2 + sd**2).sqrt())
        torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
        torch.testing.assert_close(c_noise, 0.25 * sigma.log())
        d, e = to_x0_eps(f, x, 1.0, sigma, ptype, sigma_data=sd)
        torch.testing.assert_close(d, c_skip[:, None] * x + c_out[:, None] * f)
        torch.testing.assert_close(e, (x - d) / sigma[:, None])
        out = from_x0_eps(x0, eps, 1.0, sigma, ptype, sigma_data=sd)
        x0_r, eps_r = to_x0_eps(out, x, 1.0, sigma, ptype, sigma_data=sd)
        torch.testing.assert_close(x0_r, x0)
        torch.testing.assert_close(eps_r, eps)
        if ptype == "v_prediction":
            a, b = sd * c_in, sigma * c_in  # VP: a^2 + b^2 = 1
            y0, _ = to_x0_eps(f, c_in[:, None] * x, a, b, "v_prediction")
            torch.testing.assert_close(sd * y0, d)
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0_eps(f, f, 1.0, 1.0, "sample", sigma_data=0.5)
    with pytest.raises(ValueError, match="sigma_data"):
        edm_preconditioning(1.0, 0.0)


def test_config_round_trip(tmp_path):
    ref = EDMDPMSolverMultistepScheduler(**COSXL, solver_order=3)
    s = DPMSolverPPScheduler.from_config(ref.config)
    c = s.config
    assert (c.schedule_kind, c.sigma_min, c.sigma_max, c.sigma_data, c.sigma_schedule, c.rho) == (
        "edm", 0.002, 120.0, 1.0, "exponential", 7.0)
    assert c.prediction_type == "v_prediction" and c.solver_order == 3
    s.save_pretrained(tmp_path / "ours")
    s2 = DPMSolverPPScheduler.from_pretrained(tmp_path / "ours")
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(s2.config) == public(s.config)
    # diffusers' EDM scheduler reads our saved config back, and a diffusers-saved one loads into ours
    back = EDMDPMSolverMultistepScheduler.from_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    s3 = DPMSolverPPScheduler.from_pretrained(tmp_path / "ref")
    for a in (s, s2, s3, back, ref):
        a.set_timesteps(9)
    for a in (s2, s3):
        assert a.schedule.kind == "edm"
        torch.testing.assert_close(a.timesteps, s.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(back.sigmas, ref.sigmas, rtol=0, atol=0)
    # a default in-memory config (diffusers marks every key as a default) still gives EDM's values
    d = DPMSolverPPScheduler.from_config(EDMDPMSolverMultistepScheduler().config)
    assert (d.config.sigma_min, d.config.sigma_max, d.config.sigma_data, d.config.sigma_schedule) == (
        0.002, 80.0, 0.5, "karras")
    # EDMEulerScheduler configs describe the same model
    e = DPMSolverPPScheduler.from_config(EDMEulerScheduler(sigma_schedule="exponential").config)
    assert e.schedule.kind == "edm" and e.grid_spacing == "exponential"
    # VP configs are untouched
    vp = DPMSolverPPScheduler()
    assert vp.schedule.kind == "discrete" and vp.config.schedule_kind is None and vp.init_noise_sigma == 1.0


def test_bad_edm_inputs_raise_clear_errors():
    edm = dict(schedule_kind="edm")
    with pytest.raises(ValueError, match="sigma_min=80.0, sigma_max=0.002"):
        DPMSolverPPScheduler(**edm, sigma_min=80.0, sigma_max=0.002)
    with pytest.raises(ValueError, match="sigma_min=1.0, sigma_max=1.0"):
        DPMSolverPPScheduler.from_config(EDMDPMSolverMultistepScheduler(sigma_min=1.0, sigma_max=1.0).config)
    with pytest.raises(ValueError, match="sigma_min"):
        DPMSolverPPScheduler(**edm, sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        DPMSolverPPScheduler(**edm, sigma_max=float("inf"))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_data"):
            DPMSolverPPScheduler(**edm, sigma_data=bad)
    for ptype in ("sample", "flow_prediction"):
        with pytest.raises(ValueError, match="prediction_type"):
            DPMSolverPPScheduler(**edm, prediction_type=ptype)
    with pytest.raises(ValueError, match="sigma_schedule"):
        DPMSolverPPScheduler(**edm, sigma_schedule="linear")
    with pytest.raises(ValueError, match="rho"):
        DPMSolverPPScheduler(**edm, rho=0.0)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverPPScheduler(**edm, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="schedule_kind"):
        DPMSolverPPScheduler(schedule_kind="ve")
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        DPMSolverPPScheduler(**edm, use_flow_sigmas=True)
    with pytest.raises(ValueError, match="Cosine"):
        DPMSolverPPScheduler.from_config({"_class_name": "CosineDPMSolverMultistepScheduler", "sigma_data": 1.0})
    with pytest.raises(ValueError, match="DPMSolverV3Scheduler does not support EDM"):
        DPMSolverV3Scheduler.from_config(EDMDPMSolverMultistepScheduler().config)


def _edm_convergence(order, nfes, ptype="epsilon", sd=0.5, grid="exponential", **extra):
    """Relative error of the final state against a float64 DOP853 solve of the probability-flow ODE
    ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. Eq. 4 with sigma(t) = t) from
    sigma_max to sigma_min, for the exact EDM-preconditioned mixture model driven through
    ``fewstep.sample`` (so ``init_noise_sigma``, ``scale_model_input`` and c_noise are exercised)."""
    sched = DPMSolverPPScheduler(
        schedule_kind="edm", sigma_min=0.002, sigma_max=80.0, sigma_data=sd, sigma_schedule=grid,
        prediction_type=ptype, solver_order=order, final_sigmas_type="sigma_min", lower_order_final=False,
        **extra,
    )
    model = EDMMixtureModel(SMOOTH_MIX, sd, ptype)
    z = torch.randn(16, SMOOTH_MIX.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = reference_solve(SMOOTH_MIX, z * 80.0, 80.0, 0.002)
    errs = []
    for n in nfes:
        x, nfe = sample(model, z, sched, n)
        assert nfe == n and x.dtype == torch.float64
        assert math.isclose(float(sched.sigmas[-1]), 0.002, rel_tol=1e-6)
        errs.append(((x - ref).norm() / ref.norm()).item())
    return errs


@pytest.mark.parametrize(
    "order,ptype,grid,min_slope,max_slope",
    [
        (1, "epsilon", "exponential", 0.8, 1.4),
        (2, "epsilon", "exponential", 1.6, 2.6),
        (2, "v_prediction", "karras", 1.6, 2.6),
    ],
)
def test_edm_error_falls_at_theoretical_order(order, ptype, grid, min_slope, max_slope):
    nfes = [20, 40, 80]
    errs = _edm_convergence(order, nfes, ptype, grid=grid)
    assert errs[0] > errs[1] > errs[2], errs
    slope = math.log(errs[-2] / errs[-1]) / math.log(nfes[-1] / nfes[-2])
    assert min_slope < slope < max_slope, (errs, slope)


def test_edm_2m_beats_ddim_and_exact_third_order_is_third_order():
    """Measured: DDIM 0.21 vs 2M 0.055 at 10 steps; exact-weight 3M slope 3.4 over 40 -> 80 steps
    (the diffusers-weight 3M: 2.3, see tests/test_dpmpp.py), and singlestep 2S works on EDM too."""
    e1 = _edm_convergence(1, [10])[0]
    e2 = _edm_convergence(2, [10])[0]
    assert e2 < 0.3 * e1, (e1, e2)
    exact = _edm_convergence(3, [40, 80], exact_third_order=True)
    assert math.log(exact[0] / exact[1]) / math.log(2) > 2.8, exact
    s2 = _edm_convergence(2, [40, 80], method="singlestep")
    assert 1.6 < math.log(s2[0] / s2[1]) / math.log(2) < 2.6, s2


def test_solver_grid_is_float64_karras_eq5():
    """The solver steps on the float64 Eq. 5 grid, not on the float32 public `sigmas`."""
    s = DPMSolverPPScheduler(schedule_kind="edm")
    s.set_timesteps(7)
    ramp = np.linspace(0, 1, 7)
    ref = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s._sigmas[:-1], ref, rtol=1e-13)


# ---------------------------------------------------------------------------------- guidance on EDM
def _apg_x0(dc, du, w):
    """APG with eta = 0, no momentum or clipping (Sadat et al. 2025, Eq. 9-11), written out."""
    d = dc - du
    unit = dc / dc.norm(dim=1, keepdim=True)
    return dc + (w - 1.0) * (d - (d * unit).sum(1, keepdim=True) * unit)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_x0_space_guidance_on_edm_sees_the_denoiser(pt):
    """APG in x0 space through ``fewstep.sample`` on an EDM scheduler (order 1) equals a loop written
    directly on the exact denoisers ``D_c, D_u`` (Karras et al. 2022, Eq. 7) with the VE DDIM step
    ``x <- D + (sigma_next / sigma)(x - D)``: the guidance undoes ``c_in`` and reads ``F`` as EDM's
    network output, not as a noise prediction of the scaled input."""
    from fewstep.guidance import APG

    torch.manual_seed(0)
    mix = make_gaussian_mixture(dim=16, num_components=6, num_classes=3)
    model = EDMMixtureModel(mix, 0.5, pt)
    sch = DPMSolverPPScheduler.from_config(EDMDPMSolverMultistepScheduler(prediction_type=pt, solver_order=1).config)
    n, w = 8, 4.0
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c, u = torch.arange(6) % 3, torch.full((6,), -1)
    got, nfe = sample(model, noise, sch, n, guidance=APG(scale=w), cond=c, uncond=u)
    assert nfe == 2 * n
    sigmas = [sch.alpha_sigma(i)[1] for i in range(n + 1)]
    assert sigmas[-1] == 0.0
    x = noise * float(sch.init_noise_sigma)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        s = float(np.float32(math.log(s) / 4.0) * 4.0)  # the model sees sigma through float32 c_noise
        s = math.exp(s)
        d = _apg_x0(mix.denoise_ve(x, s, c), mix.denoise_ve(x, s, u), w)
        x = d + (s_next / s) * (x - d)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    unguided, _ = sample(model, noise, sch, n, guidance=None, cond=c)
    assert (got - unguided).abs().max() > 0.05  # the guidance did act


def test_guidance_context_of_diffusers_edm_scheduler():
    """For diffusers' own EDM scheduler the context reads sigma from ``c_noise``, undoes ``c_in``
    and converts ``F`` to the exact denoiser, like the context of fewstep's EDM scheduler."""
    from fewstep.guidance import GuidanceContext, scheduler_sigma_data

    ref = EDMDPMSolverMultistepScheduler(sigma_data=0.7)
    ref.set_timesteps(6)
    ours = DPMSolverPPScheduler.from_config(ref.config)
    ours.set_timesteps(6)
    assert scheduler_sigma_data(ref) == scheduler_sigma_data(ours) == pytest.approx(0.7)
    model = EDMMixtureModel(MIX, 0.7)
    i = 2
    sigma = float(ref.sigmas[i])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sigma
    x_in = x * _c_in(sigma, 0.7)
    out = model(x_in, ref.timesteps[i])
    for sch in (ref, ours):
        ctx = GuidanceContext.from_model_input(x_in, sch.timesteps[i], sch, i)
        assert ctx.sigma == pytest.approx(sigma, rel=1e-5) and ctx.alpha == 1.0
        torch.testing.assert_close(ctx.x, x, rtol=1e-5, atol=1e-6)
        x0, _ = ctx.x0_eps(out)
        torch.testing.assert_close(x0, MIX.denoise_ve(x, math.exp(4 * float(ref.timesteps[i]))), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ctx.from_space(ctx.to_space(out, "x0"), "x0"), out, rtol=1e-9, atol=1e-9)


def test_cosine_dpm_configs_are_refused_not_misread_as_edm():
    """diffusers' CosineDPMSolverMultistepScheduler (needs torchsde, so its config is written out from
    its signature here) shares EDM's keys but not its c_noise: refused on disk and in memory."""
    from types import SimpleNamespace

    from fewstep.guidance import scheduler_sigma_data
    from fewstep.schedule import is_cosine_dpm_config, is_edm_config

    live = dict(sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, sigma_schedule="exponential", num_train_timesteps=1000,
                solver_order=2, prediction_type="v_prediction", rho=7.0, solver_type="midpoint",
                lower_order_final=True, euler_at_final=False, final_sigmas_type="zero")
    for cfg in (live, {**live, "_class_name": "CosineDPMSolverMultistepScheduler"}):
        assert is_cosine_dpm_config(cfg) and not is_edm_config(cfg)
        with pytest.raises(ValueError, match="Cosine"):
            DPMSolverPPScheduler.from_config(cfg)
    with pytest.raises(ValueError, match="not supported by fewstep guidance"):
        scheduler_sigma_data(SimpleNamespace(config=live))
    edm_live = dict(EDMDPMSolverMultistepScheduler().config)
    euler_live = dict(EDMEulerScheduler().config)
    for cfg in (edm_live, euler_live):
        assert is_edm_config(cfg) and not is_cosine_dpm_config(cfg)
