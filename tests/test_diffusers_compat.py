"""fewstep's schedulers as a diffusers drop-in (issue 11): switching from the scheduler configs real
pipelines ship, diffusers' public attributes and call conventions, and bad values refused by name.

The reference is diffusers' own ``DPMSolverMultistepScheduler`` built from the same config; the
deliberate differences are listed in docs/samplers.md ("Compatibility with diffusers").
"""

import inspect
import warnings

import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config
from scheduler_configs import SHIPPED_CONFIGS, shipped_config

from fewstep.samplers import (
    COMMON_CONFIG,
    OPTIONAL_CONFIG,
    DPMSolverPPScheduler,
    DPMSolverV3Scheduler,
    FewstepScheduler,
)
from fewstep.schedule import is_flow_matching_config
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

MIX = make_gaussian_mixture(dim=64, seed=0)


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with warnings silenced (DPM-Solver-v3 warns when it runs without EMS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _reference(cfg: dict) -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++ for a config. A FlowMatch config (SD3, Flux) needs flow sigmas switched
    on by hand in diffusers; fewstep's ``from_config`` does that itself."""
    if is_flow_matching_config(cfg):
        return DPMSolverMultistepScheduler.from_config(
            cfg, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=cfg["shift"])
    return DPMSolverMultistepScheduler.from_config(cfg)


def _sample(sched, model, x, n, mu=None, own_times=True, ref=None):
    """Sample ``n`` steps with ``sched``; with ``ref`` (lockstep) both schedulers step with the model
    output at the reference's state and the largest per-step difference is returned too."""
    kw = {"mu": mu} if mu is not None else {}
    sched.set_timesteps(n, **kw)
    if ref is not None:
        ref.set_timesteps(n, **kw)
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        out = model(x, t, None)
        nxt = sched.step(out, t, x).prev_sample
        if ref is not None:
            nxt_ref = ref.step(out, ref.timesteps[i], x).prev_sample
            worst = max(worst, (nxt - nxt_ref).abs().max().item())
            nxt = nxt_ref
        x = nxt
    return x, worst


# ------------------------------------------------------------------------------------------------
# 1. switching from the configs pipelines ship
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_switching_from_shipped_configs_reproduces_diffusers(name, one_torch_thread):
    """``DPMSolverPPScheduler.from_config(pipe.scheduler.config)`` for SD 1.5, SDXL, SD3, Flux, Wan
    2.1/2.2 (UniPC, ``solver_type="bh2"``) and PixArt: it loads, maps the values diffusers maps, and
    its samples equal diffusers' DPM-Solver++ built from the same config. VP models are sampled end to
    end (each scheduler calls the model at its own timesteps); flow models in lockstep, because
    diffusers' DPM-Solver passes flow times truncated to integers and fewstep the exact float times
    (docs/samplers.md, "Compatibility with diffusers")."""
    cfg = shipped_config(name)
    ours = DPMSolverPPScheduler.from_config(cfg)
    ref = _reference(cfg)
    assert ours.config.solver_type == ref.config.solver_type == "midpoint"
    assert ours.config.algorithm_type == ref.config.algorithm_type == "dpmsolver++"
    assert ours.config.prediction_type == ref.config.prediction_type
    mu = 0.8 if cfg.get("use_dynamic_shifting") else None  # Flux passes mu = f(image size)
    for order in (1, 2, 3):
        ours = DPMSolverPPScheduler.from_config(cfg, solver_order=order)
        ref = _reference(dict(cfg, solver_order=order))
        model = GaussianMixtureModel(MIX, ours.schedule, ours.config.prediction_type)
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(order))
        if ours.schedule.kind == "discrete":
            a, _ = _sample(ours, model, x, 8)
            b, _ = _sample(ref, model, x, 8)
            assert torch.equal(ours.timesteps, ref.timesteps)
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        else:
            _, worst = _sample(ours, model, x, 8, mu=mu, ref=ref)
            torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=1e-6, rtol=1e-6)
            assert worst < 1e-5, (name, order, worst)


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_dpm_v3_loads_every_shipped_config(name, one_torch_thread):
    """DPM-Solver-v3 switches from the same configs (keys it has no use for are ignored, as in diffusers)
    and samples (degenerate statistics without EMS) to a finite result."""
    cfg = shipped_config(name)
    s = _quiet(DPMSolverV3Scheduler.from_config, cfg)
    assert s.config.prediction_type == _reference(cfg).config.prediction_type
    model = GaussianMixtureModel(MIX, s.schedule, s.config.prediction_type)
    x, _ = _quiet(_sample, s, model, torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), 6,
                  mu=0.8 if cfg.get("use_dynamic_shifting") else None)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("foreign,expect", [
    (lambda: UniPCMultistepScheduler(solver_type="bh1"), {"solver_type": "midpoint"}),
    (lambda: UniPCMultistepScheduler(solver_type="bh2"), {"solver_type": "midpoint"}),
    (lambda: DEISMultistepScheduler(algorithm_type="deis", solver_type="logrho"),
     {"solver_type": "midpoint", "algorithm_type": "dpmsolver++"}),
], ids=["unipc-bh1", "unipc-bh2", "deis-logrho"])
def test_unipc_and_deis_values_are_mapped_like_diffusers(foreign, expect):
    """UniPC's ``bh1``/``bh2`` and DEIS' ``deis``/``logrho`` map as diffusers' DPM-Solver maps them
    (given explicitly: diffusers' ``from_config`` drops values a config lists in ``_use_default_values``).
    diffusers 0.42 itself then refuses the DEIS config (it checks ``final_sigmas_type="zero"`` against
    the unmapped ``"deis"``); fewstep loads it."""
    cfg = foreign().config
    ours = DPMSolverPPScheduler.from_config(cfg)
    for key, value in expect.items():
        assert ours.config[key] == value
    if "algorithm_type" not in expect:
        assert DPMSolverMultistepScheduler.from_config(cfg).config.solver_type == "midpoint"


def _minimal_scheduler(**extra):
    """A new FewstepScheduler subclass that declares the table keywords plus ``extra`` and does
    nothing of its own: what the base gives every scheduler added later (momentum, USF)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
               for k, v in {**COMMON_CONFIG, **OPTIONAL_CONFIG, **extra}.items()]

    def __init__(self, **kwargs):
        self._setup()

    __init__.__signature__ = inspect.Signature(params)
    return type("Minimal", (FewstepScheduler,), {"__init__": register_to_config(__init__)})


def test_a_new_scheduler_inherits_the_value_mapping():
    cls = _minimal_scheduler(solver_type="midpoint", algorithm_type="dpmsolver++")
    s = cls.from_config(DEISMultistepScheduler(algorithm_type="deis", solver_type="logrho").config)
    assert (s.config.solver_type, s.config.algorithm_type) == ("midpoint", "dpmsolver++")
    s = cls.from_config(UniPCMultistepScheduler(solver_type="bh2").config)
    assert s.config.solver_type == "midpoint"


# ------------------------------------------------------------------------------------------------
# 2. zero terminal SNR
# ------------------------------------------------------------------------------------------------
BETAS = {"linear": {}, "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
         "cosine": dict(beta_schedule="squaredcos_cap_v2")}


@pytest.mark.parametrize("betas", sorted(BETAS))
def test_zero_terminal_snr_matches_diffusers(betas, one_torch_thread):
    """``rescale_betas_zero_snr=True`` (Lin et al. 2024) with every beta schedule: with linear betas
    diffusers' float32 ``alphas_cumprod`` falls below the forced last value ``2**-24`` at t = 996-998;
    fewstep keeps diffusers' table as ``alphas_cumprod`` and samples like diffusers on trailing grids."""
    cfg = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
               **BETAS[betas])
    ref = DPMSolverMultistepScheduler(**cfg)
    ours = DPMSolverPPScheduler(**cfg)
    assert ours.alphas_cumprod.dtype == torch.float32 and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    for order in (1, 2, 3):
        ours = DPMSolverPPScheduler(solver_order=order, **cfg)
        ref = DPMSolverMultistepScheduler(solver_order=order, **cfg)
        model = GaussianMixtureModel(MIX, ours.schedule, "v_prediction")
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(order))
        a, _ = _sample(ours, model, x, 10)
        b, _ = _sample(ref, model, x, 10)
        assert torch.equal(ours.timesteps, ref.timesteps)
        torch.testing.assert_close(ours.sigmas, ref.sigmas)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. state before set_timesteps
# ------------------------------------------------------------------------------------------------
def test_state_and_add_noise_before_set_timesteps():
    """As in diffusers, ``step_index``/``begin_index`` are None and ``add_noise`` works before
    ``set_timesteps`` (training scripts call it so). The reference is DDPMScheduler's ``add_noise``
    (``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) z``): diffusers' DPMSolverMultistepScheduler reads
    its ascending ``sigmas`` with indices into its descending ``timesteps`` there (t = 10 gets the noise
    level of t = 989), fewstep gives every timestep its own level."""
    from diffusers import DDPMScheduler

    sd = BETAS["scaled_linear"]
    for cls in (DPMSolverPPScheduler, DPMSolverV3Scheduler):
        s = _quiet(cls, **sd)
        assert s.step_index is None and s.begin_index is None
        x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
        z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([10, 500, 999])
        torch.testing.assert_close(s.add_noise(x0, z, t), DDPMScheduler(**sd).add_noise(x0, z, t))
    flow = DPMSolverPPScheduler.from_config(shipped_config("sd3"))
    assert flow.step_index is None and flow.begin_index is None
    t = torch.tensor([250.0, 750.0])
    s = (t / 1000).reshape(-1, 1)
    torch.testing.assert_close(flow.add_noise(x0[:2], z[:2], t), (1 - s) * x0[:2] + s * z[:2])


# ------------------------------------------------------------------------------------------------
# 4. public attributes diffusers code reads
# ------------------------------------------------------------------------------------------------
TABLES = ("betas", "alphas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t")


@pytest.mark.parametrize("cfg", [BETAS["scaled_linear"], BETAS["linear"], BETAS["cosine"],
                                 dict(rescale_betas_zero_snr=True)], ids=["sd", "linear", "cosine", "zsnr"])
def test_training_tables_equal_diffusers(cfg):
    ours, ref = DPMSolverPPScheduler(**cfg), DPMSolverMultistepScheduler(**cfg)
    for name in TABLES:
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    v3 = _quiet(DPMSolverV3Scheduler, **cfg)
    assert all(torch.equal(getattr(v3, name), getattr(ref, name)) for name in TABLES)


def test_training_tables_are_none_where_no_beta_schedule_exists():
    """A flow-matching or EDM model has no DDPM betas; diffusers' DPM-Solver computes tables from its
    default betas there, fewstep says None."""
    flow = DPMSolverPPScheduler.from_config(shipped_config("sd3"))
    edm = DPMSolverPPScheduler(schedule_kind="edm")
    for s in (flow, edm):
        assert all(getattr(s, name) is None for name in TABLES)


def _lockstep_state(cfg, n, edit=None):
    """Step fewstep and diffusers with the same model outputs; before every step compare
    ``convert_model_output``, after it ``model_outputs`` and ``lower_order_nums``. ``edit(sched)``
    runs on both after step 3 (a pipeline editing the history, as ChronoEdit does). Returns the end state."""
    ours, ref = DPMSolverPPScheduler(**cfg), DPMSolverMultistepScheduler(**cfg)
    assert ours.model_outputs == ref.model_outputs == [None] * cfg["solver_order"]
    assert ours.lower_order_nums == ref.lower_order_nums == 0
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    model = GaussianMixtureModel(MIX, ours.schedule, cfg.get("prediction_type", "epsilon"))
    x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # diffusers' thresholding wants 4-D
    for i, t in enumerate(ref.timesteps):
        out = model(x, t, None)
        if ref.step_index is None:  # diffusers' convert_model_output needs the index
            ref._init_step_index(t)
        torch.testing.assert_close(ours.convert_model_output(out, sample=x), ref.convert_model_output(out, sample=x))
        x_ref = ref.step(out, t, x).prev_sample
        x_ours = ours.step(out, t, x).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)
        assert ours.lower_order_nums == ref.lower_order_nums
        for a, b in zip(ours.model_outputs, ref.model_outputs):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
        if i == 3 and edit is not None:
            edit(ours)
            edit(ref)
        x = x_ref
    return x


def test_model_outputs_lower_order_nums_and_convert_model_output_follow_diffusers(one_torch_thread):
    for order in (1, 2, 3):
        _lockstep_state(dict(BETAS["scaled_linear"], solver_order=order, prediction_type="v_prediction"), 8)
    _lockstep_state(dict(BETAS["scaled_linear"], solver_order=2, thresholding=True, sample_max_value=1.5,
                         prediction_type="sample"), 6)


def test_editing_model_outputs_acts_on_the_solver(one_torch_thread):
    """A pipeline that edits ``scheduler.model_outputs`` between steps (ChronoEdit slices them) changes
    the next steps of fewstep's multistep solver exactly as it changes diffusers'."""

    def halve(s):
        for j, m in enumerate(s.model_outputs):
            s.model_outputs[j] = 0.5 * m

    cfg = dict(BETAS["scaled_linear"], solver_order=3)
    edited, plain = _lockstep_state(cfg, 8, edit=halve), _lockstep_state(cfg, 8)
    assert (edited - plain).abs().max() > 1e-3  # the edit had an effect (on both, equally)


# ------------------------------------------------------------------------------------------------
# 5. honest compatibles
# ------------------------------------------------------------------------------------------------
KIND_CONFIGS = {
    "discrete": lambda: DPMSolverPPScheduler.from_config(shipped_config("sd15")),
    "flow": lambda: DPMSolverPPScheduler.from_config(shipped_config("wan21")),
    "edm": lambda: DPMSolverPPScheduler(schedule_kind="edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5),
}


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_compatibles_are_honest_and_round_trip(kind):
    """``scheduler.compatibles`` (what UIs offer) lists only schedulers that read this config as the same
    kind of model: no EDM or FlowMatch scheduler for an SD config, only flow-sigma solvers for a flow
    config, only EDM schedulers for an EDM config. A round trip through each keeps the kind and grid."""
    s = KIND_CONFIGS[kind]()
    names = {c.__name__ for c in s.compatibles}
    assert names == set(s._compatibles) and "DPMSolverPPScheduler" in names
    if kind == "discrete":
        assert {"DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DDIMScheduler"} <= names
        assert not any(n.startswith(("EDM", "FlowMatch")) for n in names)
    elif kind == "flow":
        assert {"DPMSolverMultistepScheduler", "UniPCMultistepScheduler"} <= names
        assert not names & {"EulerDiscreteScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler"}
        assert not any(n.startswith("EDM") for n in names)
    else:
        assert {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"} <= names
        assert "DPMSolverMultistepScheduler" not in names and "DPMSolverV3Scheduler" not in names
    s.set_timesteps(10)
    for cls in s.compatibles:
        try:
            other = _quiet(cls.from_config, s.config)
        except ImportError:  # DPMSolverSDEScheduler without torchsde
            continue
        back = _quiet(DPMSolverPPScheduler.from_config, other.config)
        assert back.schedule.kind == s.schedule.kind, cls.__name__
        back.set_timesteps(10)
        if cls.__name__ == "DPMSolverV3Scheduler":  # deliberately samples on its own grid (docs/dpm-v3.md)
            own = _quiet(DPMSolverPPScheduler.from_config, s.config,
                         **{k: other.config[k] for k in ("timestep_spacing", "timestep_power", "use_karras_sigmas")})
            own.set_timesteps(10)
            torch.testing.assert_close(back.sigmas, own.sigmas, msg=cls.__name__)
            continue
        torch.testing.assert_close(back.sigmas, s.sigmas, msg=cls.__name__)


# ------------------------------------------------------------------------------------------------
# 6. Beta sampling schedule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("betas", ["scaled_linear", "linear"])
def test_beta_sigmas_match_diffusers(betas, one_torch_thread):
    """``use_beta_sigmas=True`` (Lee et al. 2024, "Beta Sampling is All You Need": noise levels at the
    quantiles of Beta(0.6, 0.6) between the schedule's ends) places diffusers' sigmas and samples like
    diffusers in lockstep. Model times are rounded, diffusers truncates them (docs/samplers.md)."""
    cfg = dict(use_beta_sigmas=True, prediction_type="v_prediction", **BETAS[betas])
    for n in (5, 12, 30):
        ours, ref = DPMSolverPPScheduler(**cfg), DPMSolverMultistepScheduler(**cfg)
        exact = DPMSolverPPScheduler(round_timesteps=False, **cfg)
        for s in (ours, ref, exact):
            s.set_timesteps(n)
        torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-6, atol=0)
        t = exact.timesteps.double()
        assert torch.equal(ours.timesteps, t.round().long())
        below = t - ref.timesteps.double()  # diffusers truncates (its float32 levels: 999 becomes 998)
        assert ((below > -1e-3) & (below < 1 + 1e-3)).all()
    for order in (1, 2, 3):
        ours = DPMSolverPPScheduler(solver_order=order, **cfg)
        ref = DPMSolverMultistepScheduler(solver_order=order, **cfg)
        model = GaussianMixtureModel(MIX, ours.schedule, "v_prediction")
        _, worst = _sample(ours, model, torch.randn(4, 64, generator=torch.Generator().manual_seed(order)), 10,
                           ref=ref)
        assert worst < 1e-5, (order, worst)


# ------------------------------------------------------------------------------------------------
# 7. call conventions
# ------------------------------------------------------------------------------------------------
def test_step_tuple_is_prev_sample_only_and_x0_stays_on_the_output():
    """``step(..., return_dict=False)`` returns ``(prev_sample,)`` as diffusers does; the data prediction
    stays available as ``pred_original_sample`` of the returned output object."""
    ref, ours = DPMSolverMultistepScheduler(**BETAS["scaled_linear"]), DPMSolverPPScheduler(**BETAS["scaled_linear"])
    for s in (ref, ours):
        s.set_timesteps(4)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    out = GaussianMixtureModel(MIX, ours.schedule)(x, ours.timesteps[0], None)
    a = ref.step(out, ref.timesteps[0], x, return_dict=False)
    b = ours.step(out, ours.timesteps[0], x, return_dict=False)
    assert isinstance(b, tuple) and len(b) == len(a) == 1
    torch.testing.assert_close(b[0], a[0])
    ours.set_timesteps(4)
    x0 = ours.convert_model_output(out, sample=x)  # at the first step
    full = ours.step(out, ours.timesteps[0], x)
    torch.testing.assert_close(full.prev_sample, b[0])
    torch.testing.assert_close(full.pred_original_sample, x0)


def test_set_timesteps_takes_diffusers_positional_order():
    """diffusers' DPM-Solver: ``set_timesteps(num_inference_steps, device, mu, timesteps)``."""
    cfg = shipped_config("flux_dev")
    by_position, by_name = DPMSolverPPScheduler.from_config(cfg), DPMSolverPPScheduler.from_config(cfg)
    by_position.set_timesteps(6, "cpu", 0.9)
    by_name.set_timesteps(6, device="cpu", mu=0.9)
    torch.testing.assert_close(by_position.sigmas, by_name.sigmas)
    s = DPMSolverPPScheduler(**BETAS["scaled_linear"])
    s.set_timesteps(None, None, None, [999, 500, 100])
    assert s.timesteps.tolist() == [999, 500, 100]
    params = list(inspect.signature(DPMSolverMultistepScheduler.set_timesteps).parameters)
    assert list(inspect.signature(DPMSolverPPScheduler.set_timesteps).parameters)[: len(params)] == params


def test_timesteps_before_set_timesteps_are_diffusers_float32():
    """Before ``set_timesteps`` ``timesteps`` are float32 999 .. 0 as in diffusers. ``sigmas`` there are
    each timestep's level (diffusers' DPM-Solver stores them in the opposite order, docs/samplers.md)."""
    ref, ours = DPMSolverMultistepScheduler(**BETAS["scaled_linear"]), DPMSolverPPScheduler(**BETAS["scaled_linear"])
    assert ours.timesteps.dtype == ref.timesteps.dtype == torch.float32 and torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.flip(0))
    ours.set_timesteps(10)
    assert ours.timesteps.dtype == torch.int64


def test_exponential_sigmas_round_where_diffusers_truncates(one_torch_thread):
    """``use_exponential_sigmas``: the same noise levels as diffusers; the model is called at the nearest
    integer time (diffusers: the integer part, up to one step lower than the level the solver uses)."""
    cfg = dict(use_exponential_sigmas=True, **BETAS["scaled_linear"])
    ours, ref, exact = DPMSolverPPScheduler(**cfg), DPMSolverMultistepScheduler(**cfg), \
        DPMSolverPPScheduler(round_timesteps=False, **cfg)
    for s in (ours, ref, exact):
        s.set_timesteps(10)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-6, atol=0)
    t = exact.timesteps.double()
    assert torch.equal(ours.timesteps, t.round().long())
    below = t - ref.timesteps.double()
    assert ((below > -1e-3) & (below < 1 + 1e-3)).all() and not torch.equal(ours.timesteps, ref.timesteps)
    model = GaussianMixtureModel(MIX, ours.schedule)
    _, worst = _sample(ours, model, torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), 10, ref=ref)
    assert worst < 1e-5


# ------------------------------------------------------------------------------------------------
# 8. singlestep: explicit grids are the evaluation points
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_set_timesteps_of_its_own_timesteps_is_idempotent(order, one_torch_thread):
    """``timesteps`` of a singlestep scheduler list every model evaluation, so passing them back
    (``set_timesteps(timesteps=s.timesteps)``, or ``sigmas=s.sigmas``) gives the same evaluations and
    the same solver: explicit grids are the evaluation points, grouped into DPM-Solver-fast intervals."""
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for rounded in (False, True):
        s = DPMSolverPPScheduler(method="singlestep", solver_order=order, round_timesteps=rounded,
                                 prediction_type="v_prediction", **BETAS["scaled_linear"])
        model = GaussianMixtureModel(MIX, s.schedule, "v_prediction")
        s.set_timesteps(8)
        ts, sig = s.timesteps.clone(), s.sigmas.clone()
        first, _ = _sample(s, model, z, 8)
        for explicit in ({"timesteps": ts.tolist()}, {"sigmas": sig.tolist()}):
            s.set_timesteps(**explicit)
            assert len(s.timesteps) == 8  # public sigmas are float32: the times they give back match to rounding
            torch.testing.assert_close(s.timesteps, ts, rtol=1e-6, atol=0)
            x = z
            for t in s.timesteps:
                x = s.step(model(x, t, None), t, x).prev_sample
            # rounded model times: the levels are re-read at the integer times (as for any explicit grid)
            torch.testing.assert_close(x, first, rtol=0, atol=3e-3 if rounded else 1e-6)


# ------------------------------------------------------------------------------------------------
# values that gave silent wrong results or raw tracebacks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    (dict(lambda_min_clipped=100.0), "lambda_min_clipped"),  # clipped every timestep: NFE 0, noise returned
    (dict(lambda_min_clipped=float("nan")), "lambda_min_clipped"),
    (dict(thresholding=True, sample_max_value=-1.0), "sample_max_value"),  # every output was 1.0
    (dict(thresholding=True, sample_max_value=0.5), "sample_max_value"),
    (dict(thresholding=True, dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
    (dict(karras_rho=float("nan")), "karras_rho"),
    (dict(karras_rho=float("inf")), "karras_rho"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=float("nan")), "flow_shift"),
    (dict(beta_end=2.0), "beta_end"),
    (dict(beta_start=0.0), "beta_start"),
    (dict(beta_schedule="scaled_linear", beta_end=float("nan")), "beta_end"),
])
@pytest.mark.parametrize("cls", [DPMSolverPPScheduler, DPMSolverV3Scheduler], ids=lambda c: c.__name__)
def test_impossible_values_are_refused_by_name(cls, kwargs, name):
    value = next(iter(v for k, v in kwargs.items() if k == name))
    with pytest.raises(ValueError, match=name) as err:
        _quiet(cls, **kwargs)
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_lambda_min_clipped_error_states_the_allowed_range():
    with pytest.raises(ValueError, match=r"lambda_min_clipped=100.*at most 4\.21 ") as err:
        DPMSolverPPScheduler(lambda_min_clipped=100.0)
    assert "-5.1" in str(err.value)  # the value diffusers recommends for cosine schedules
    DPMSolverPPScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1).set_timesteps(10)  # still fine


def test_unavailable_device_is_refused_by_name():
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    s = DPMSolverPPScheduler()
    with pytest.raises(ValueError, match=f"device='{device}'"):
        s.set_timesteps(10, device=device)


def test_misspelt_keyword_warns_with_the_closest_valid_one():
    """diffusers ignores config keys a scheduler does not know (other schedulers' keys), and so does
    fewstep; an explicit keyword that no scheduler knows is a typo and is named, with a suggestion."""
    cfg = shipped_config("sd15")
    with pytest.warns(UserWarning, match=r"solver_ordr=3.*solver_order"):
        s = DPMSolverPPScheduler.from_config(cfg, solver_ordr=3)
    assert s.config.solver_order == 2
    with pytest.warns(UserWarning, match=r"use_karas_sigmas.*use_karras_sigmas"):
        _quiet_v3 = DPMSolverV3Scheduler.from_config  # noqa: N806
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="DPMSolverV3Scheduler got no EMS")
            _quiet_v3(cfg, use_karas_sigmas=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keys of other schedulers and loader keywords stay silent
        DPMSolverPPScheduler.from_config(cfg, clip_sample=False, set_alpha_to_one=False, subfolder=None)


def test_every_ddpm_variance_type_loads():
    """DDPM configs carry ``variance_type`` values DPM-Solver does not use (diffusers ignores all but
    the learned ones); fewstep loads them too and strips only learned variance channels."""
    from diffusers import DDPMScheduler

    for vt in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"):
        s = DPMSolverPPScheduler.from_config(DDPMScheduler(variance_type=vt).config)
        assert s.config.variance_type == DPMSolverMultistepScheduler.from_config(
            DDPMScheduler(variance_type=vt).config).config.variance_type == vt


def test_a_linear_time_shift_is_refused_not_applied_as_exponential():
    """Dynamic shifting with ``mu``: diffusers' DPM-Solver supports ``time_shift_type="exponential"``
    (``shift = exp(mu)``) only; fewstep used to apply it to a ``"linear"`` config silently."""
    cfg = dict(shipped_config("flux_dev"), time_shift_type="linear")
    s = DPMSolverPPScheduler.from_config(cfg)
    with pytest.raises(ValueError, match="time_shift_type='linear'"):
        s.set_timesteps(8, mu=0.8)


def test_mu_is_ignored_without_dynamic_shifting_as_flowmatch_does():
    """The Flux pipeline passes ``mu`` (from the image size) with every config; FLUX.1-schnell's says
    ``use_dynamic_shifting=false`` and FlowMatchEuler then keeps its static ``shift``. fewstep used to
    apply ``exp(mu)`` anyway (diffusers' DPM-Solver fails an assert)."""
    s = DPMSolverPPScheduler.from_config(shipped_config("flux_schnell"))
    s.set_timesteps(8)
    static = s.sigmas.clone()
    s.set_timesteps(8, mu=1.1)
    torch.testing.assert_close(s.sigmas, static, rtol=0, atol=0)
    dynamic = DPMSolverPPScheduler.from_config(shipped_config("flux_dev"))
    dynamic.set_timesteps(8, mu=1.1)
    assert dynamic.schedule.shift == pytest.approx(3.0041660239464334)  # exp(1.1)
