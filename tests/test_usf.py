"""USF schedules and USFScheduler: the exported hand-set schedulers reproduce their own samples, the
noise-prediction space against its closed form and diffusers' DPM-Solver, the analytical first step,
the file format and its errors."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from fewstep.sample import sample
from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler, USFScheduler
from fewstep.samplers.dpm_v3_update import NoiseCoefficients, V3Point, v3_update
from fewstep.samplers.usf import relaxation_factor
from fewstep.samplers.usf_schedule import (
    SHIPPED,
    USFCorrector,
    USFSchedule,
    USFStep,
    multistep_step,
    schedule_from_scheduler,
)
from fewstep.schedule import NoiseSchedule
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")


@pytest.fixture(scope="module")
def mixture():
    mix = make_gaussian_mixture(dim=16, seed=0)
    model = GaussianMixtureModel(mix, NoiseSchedule.from_config(SD))
    noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, noise


def _run(model, noise, sched, n=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sample(model, noise, sched, n)


# ------------------------------------------------------------------------------ exports reproduce
EXPORTS = {
    "ddim": dict(solver_order=1),
    "2m": dict(solver_order=2),
    "2m-heun-logsnr": dict(solver_order=2, solver_type="heun", timestep_spacing="logsnr", round_timesteps=False),
    "3m": dict(solver_order=3),
    "3m-karras-rounded": dict(solver_order=3, use_karras_sigmas=True),
    "3m-exact-sigma-min": dict(solver_order=3, exact_third_order=True, final_sigmas_type="sigma_min"),
    "2s": dict(solver_order=2, method="singlestep"),
    "3s-heun": dict(solver_order=3, method="singlestep", solver_type="heun"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_exported_dpmpp_schedulers_reproduce_their_samples(mixture, name):
    model, noise = mixture
    sched = DPMSolverPPScheduler.from_config(SD, **EXPORTS[name])
    for n in (4, 7):
        want, nfe_want = _run(model, noise, sched, n)
        exported = schedule_from_scheduler(sched, n)
        assert exported.nfe == n
        usf = USFScheduler.from_config(SD, schedule=json.loads(exported.to_json()))  # through the file format
        got, nfe = _run(model, noise, usf, n)
        assert nfe == nfe_want
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # not a tautology: a different hand-set scheduler gives different samples
    other = _run(model, noise, DPMSolverPPScheduler.from_config(SD, solver_order=1, timestep_spacing="leading"), 7)[0]
    assert (other - want).abs().max() > 1e-3


def test_exported_v3_with_ems_reproduces_its_samples(mixture):
    from fewstep.samplers import compute_ems

    cfg = dict(beta_schedule="linear", prediction_type="epsilon")
    base = DPMSolverPPScheduler(**cfg)
    mix = make_gaussian_mixture(dim=16, seed=0)
    model = GaussianMixtureModel(mix, base.schedule)
    ems = compute_ems(model, base.config, mix.sample(128, generator=torch.Generator().manual_seed(1)), num_grid=60,
                      batch_size=128, dtype=torch.float64, progress=False)
    noise = mixture[1]
    for kw in (dict(solver_order=3, timestep_spacing="logsnr"), dict(solver_order=2, predictor_pseudo=True,
                                                                     corrector_pseudo=True, half=True)):
        v3 = DPMSolverV3Scheduler.from_config(cfg, ems=ems, **kw)
        want, _ = _run(model, noise, v3, 6)
        exported = schedule_from_scheduler(v3, 6, ems_name="test")
        assert exported.uses_v3 and exported.ems["name"] == "test" and exported.ems["num_grid"] == 60
        assert any(s.corrector is not None for s in exported.steps)
        got, _ = _run(model, noise, USFScheduler.from_config(cfg, schedule=exported.to_dict(), ems=ems))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no EMS were given"):
        USFScheduler.from_config(cfg, schedule=exported)


def test_exports_run_inside_the_digits_pipeline():
    """The float32 digits teacher through DigitsPipeline: 2M, 3M and v3 (shipped EMS) exports give
    the native scheduler's images."""
    from fewstep.models import load_digits_pipeline
    from fewstep.models.pipeline import load_digits_scheduler_config

    cfg = load_digits_scheduler_config()
    pipe = load_digits_pipeline()
    natives = [DPMSolverPPScheduler.from_config(cfg, solver_order=2),
               DPMSolverPPScheduler.from_config(cfg, solver_order=3, timestep_spacing="time_power",
                                                timestep_power=1.3),
               DPMSolverV3Scheduler.from_config(cfg, ems="digits", solver_order=2)]
    for native in natives:
        images = []
        for sched in (native, USFScheduler.from_config(cfg, schedule=schedule_from_scheduler(native, 5,
                                                                                            ems_name="digits"))):
            pipe.scheduler = sched
            images.append(pipe([1, 7], num_inference_steps=5, guidance_scale=1.0, output_type="pt",
                               generator=torch.Generator().manual_seed(3)).images)
        torch.testing.assert_close(images[1], images[0], rtol=0, atol=2e-5)


def test_exporting_other_schedulers_is_refused():
    from diffusers import DDIMScheduler

    with pytest.raises(TypeError, match="cannot export DDIMScheduler"):
        schedule_from_scheduler(DDIMScheduler(), 5)
    with pytest.raises(ValueError, match="stochastic"):
        schedule_from_scheduler(DPMSolverPPScheduler(algorithm_type="sde-dpmsolver++"), 5)


# ------------------------------------------------------------------------------ the update math
def _vp(lam, **kw):
    sigma = 1.0 / math.sqrt(1.0 + math.exp(2.0 * lam))
    return V3Point(lam, sigma * math.exp(lam), sigma, **kw)


def test_noise_coefficients_integrate_polynomial_noise_exactly():
    """``x_t = (alpha_t/alpha_s) x_s - alpha_t int e^{-lambda} eps dlambda`` for a cubic eps(lambda):
    the third-order noise-space update through four points is exact (closed form of the integral)."""
    ls, lt, xs = 0.2, 1.1, 0.4
    coeffs = [0.3, -0.8, 0.5, 0.7]
    h = lt - ls

    def eps(lam):
        return sum(c * (lam - ls) ** k for k, c in enumerate(coeffs))

    integral = sum(c * math.exp(-ls) * math.factorial(k) * (1 - math.exp(-h) * sum(h**j / math.factorial(j)
                                                                                   for j in range(k + 1)))
                   for k, c in enumerate(coeffs))
    s, t = _vp(ls), _vp(lt)
    exact = t.alpha / s.alpha * xs - t.alpha * integral
    lams = [ls, -0.3, -0.9, -1.4]
    pts = [_vp(lam, f=torch.tensor(math.exp(-lam) * eps(lam), dtype=torch.float64)) for lam in lams]
    got = v3_update(torch.tensor(xs, dtype=torch.float64), pts, t, 4, NoiseCoefficients())
    assert got.item() == pytest.approx(exact, abs=1e-13)
    assert abs(v3_update(torch.tensor(xs, dtype=torch.float64), pts, t, 3, NoiseCoefficients()).item() - exact) > 1e-4


def test_noise_space_matches_diffusers_dpmsolver(mixture):
    """USF noise-prediction 2M (midpoint = relaxation dpmsolver-2) and 3M (halved second derivative)
    against diffusers' deprecated ``algorithm_type="dpmsolver"`` on the same points."""
    from diffusers import DPMSolverMultistepScheduler

    model, noise = mixture
    n = 6
    for order in (2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = DPMSolverMultistepScheduler.from_config(SD, algorithm_type="dpmsolver", solver_order=order,
                                                          timestep_spacing="trailing", final_sigmas_type="sigma_min")
        want, _ = _run(model, noise.float(), ref, n)
        ref.set_timesteps(n)
        steps = []
        for i in range(n):
            o = min(order, i + 1, n - i if i >= n - 2 else order)
            kw = {"relaxation": "dpmsolver-2"} if o == 2 else ({"d2_scale": 0.5} if o == 3 else {})
            steps.append(multistep_step("noise", o, **kw))
        usf = USFScheduler.from_config(SD, schedule=USFSchedule(tuple(float(t) for t in ref.timesteps), tuple(steps),
                                                                t_end=0.0))
        got, _ = _run(model, noise, usf)
        torch.testing.assert_close(got.float(), want, rtol=0, atol=5e-5)
        data_space = DPMSolverMultistepScheduler.from_config(SD, solver_order=order, timestep_spacing="trailing",
                                                             final_sigmas_type="sigma_min")
        assert (got.float() - _run(model, noise.float(), data_space, n)[0]).abs().max() > 1e-3


def test_relaxation_factors_limits_and_2m_midpoint():
    for kind in ("dpmsolver-2", "unipc-bh2", "unipc-bh1"):
        for space in ("data", "noise"):
            assert relaxation_factor(kind, 1e-4, space) == pytest.approx(1.0, abs=1e-3)  # -> 1 as h -> 0
    assert relaxation_factor("linear", 0.5, "data", 0.2) == pytest.approx(1.1)
    assert relaxation_factor("exp", 0.5, "noise", 0.5) == pytest.approx(1 + 0.5 * math.expm1(0.5))
    assert relaxation_factor("none", 3.0, "v3") == 1.0
    h = 0.7  # DPM-Solver++ 2M: midpoint weight -0.5 alpha_t expm1(-h) h over the Taylor one alpha_t (h + expm1(-h))
    want = -0.5 * h * math.expm1(-h) / (h + math.expm1(-h))
    assert relaxation_factor("dpmsolver-2", h, "data") == pytest.approx(want)


# ------------------------------------------------------------------------------ the scheduler
def _afs_schedule(kind="zero_x0", mean=None):
    return USFSchedule((999.0, 700.0, 400.0, 150.0, 30.0), (USFStep(), multistep_step("data", 2),
                       multistep_step("noise", 3, corrector=USFCorrector(3, relaxation="unipc-bh2")),
                       multistep_step("data", 2, relaxation="linear", relaxation_coefficient=0.1), USFStep()),
                       afs=kind, afs_mean=mean)


def test_analytical_first_step_saves_an_evaluation_and_matches_its_definition(mixture):
    model, noise = mixture
    s = _afs_schedule()
    usf = USFScheduler.from_config(SD, schedule=s)
    got, nfe = _run(model, noise, usf)
    assert nfe == s.nfe == 4 and len(usf.timesteps) == 4 and float(usf.timesteps[0]) == 700.0
    # the same schedule with the first point evaluated by a model that returns eps = x / sigma there
    plain = USFScheduler.from_config(SD, schedule=json.loads(json.dumps({**s.to_dict(), "afs": "none", "nfe": 5})))
    a0, s0 = float(plain.schedule.alpha(999.0)), float(plain.schedule.sigma(999.0))

    def model_afs(x, t, c):
        return x / s0 if float(t) == 999.0 else model(x, t, c)

    want, nfe_plain = _run(model_afs, noise, plain)
    assert nfe_plain == 5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    mean = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64)
    got_mean, _ = _run(model, noise, USFScheduler.from_config(SD, schedule=_afs_schedule("mean_x0", mean.tolist())))

    def model_mean(x, t, c):
        return (x - a0 * mean) / s0 if float(t) == 999.0 else model(x, t, c)

    torch.testing.assert_close(got_mean, _run(model_mean, noise, plain)[0], rtol=0, atol=1e-12)
    assert (got_mean - got).abs().max() > 1e-6


def test_afs_needs_scale_model_input(mixture):
    model, noise = mixture
    usf = USFScheduler.from_config(SD, schedule=_afs_schedule())
    usf.set_timesteps()
    t = usf.timesteps[0]
    with pytest.raises(ValueError, match="scale_model_input"):
        usf.step(model(noise, t, None), t, noise)


def test_set_timesteps_takes_the_schedules_points(mixture, tmp_path):
    model, noise = mixture
    s = _afs_schedule("none")
    path = s.save(tmp_path / "s.json")
    usf = USFScheduler.from_config(SD, schedule=str(path))
    with pytest.warns(UserWarning, match="num_inference_steps=9 ignored"):
        usf.set_timesteps(9)
    assert usf.timesteps.tolist() == [999, 700, 400, 150, 30] and usf.timesteps.dtype == torch.float32
    with pytest.raises(ValueError, match="fixes its own points"):
        usf.set_timesteps(timesteps=[999, 500])
    rounded = USFScheduler.from_config(SD, schedule=s, round_timesteps=True)
    rounded.set_timesteps()
    assert rounded.timesteps.dtype == torch.int64
    with pytest.raises(ValueError, match="no schedule"):
        USFScheduler.from_config(SD).set_timesteps(5)
    # the config carries the schedule: save_pretrained / from_pretrained and from_config round trips
    usf.save_pretrained(tmp_path / "sched")
    again = USFScheduler.from_pretrained(tmp_path / "sched")
    assert again.usf_schedule.to_dict() == usf.usf_schedule.to_dict()
    copy_ = USFScheduler.from_config(usf.config)
    torch.testing.assert_close(_run(model, noise, copy_)[0], _run(model, noise, usf)[0], rtol=0, atol=0)


def test_img2img_begin_index_runs_first_order_from_there(mixture):
    model, noise = mixture
    usf = USFScheduler.from_config(SD, schedule=_afs_schedule("none"))
    usf.set_timesteps()
    usf.set_begin_index(2)
    x = usf.add_noise(torch.zeros_like(noise), noise, usf.timesteps[2:3])
    for t in usf.timesteps[2:]:
        x = usf.step(model(x, t, None), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_flow_matching_config():
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    s = USFSchedule((999.0, 600.0, 200.0), (USFStep(), multistep_step("data", 2), USFStep()))
    usf = USFScheduler.from_config(cfg, schedule=s)
    usf.set_timesteps()
    assert usf.config.use_flow_sigmas and usf.schedule.kind == "flow"
    with pytest.raises(ValueError, match="infinite half log-SNR"):
        USFScheduler.from_config(cfg, schedule=USFSchedule((1000.0, 500.0), (USFStep(), USFStep())))


def test_ems_mismatch_warns_and_shipped_names_resolve(tmp_path):
    from fewstep.models.pipeline import load_digits_scheduler_config
    from fewstep.samplers import EMS

    cfg = load_digits_scheduler_config()
    v3 = DPMSolverV3Scheduler.from_config(cfg, ems="digits", solver_order=2)
    s = schedule_from_scheduler(v3, 4, ems_name="digits")
    USFScheduler.from_config(cfg, schedule=s.to_dict())  # the schedule names its shipped EMS
    other = EMS.load("digits")
    other.l = other.l + 1e-3
    other._precompute()
    with pytest.warns(UserWarning, match="re-run `fewstep search`"):
        USFScheduler.from_config(cfg, schedule=s, ems=other)
    assert set(SHIPPED) >= {"digits-nfe5", "digits-cfg2-nfe5"}


# ------------------------------------------------------------------------------ the file format
def _good() -> dict:
    return {"format": "fewstep-usf-schedule", "version": 1, "nfe": 3, "timesteps": [999, 500, 100], "t_end": "zero",
            "afs": "none", "steps": [{"prediction": "data", "order": 1},
                                     {"prediction": "noise", "order": 2, "points": [1]},
                                     {"prediction": "data", "order": 1}]}


BAD = [
    (lambda d: d.update(timesteps=[999, 999, 100]), "strictly decreasing"),
    (lambda d: d["steps"].pop(), "steps has 2 entries but timesteps has 3"),
    (lambda d: d["steps"][1].update(order=3), "order=3 needs 2 derivative point"),
    (lambda d: d["steps"][1].update(points=[2]), "point -1 does not exist"),
    (lambda d: d["steps"][2].update(order=2, points=[1]), "ends at sigma = 0"),
    (lambda d: d["steps"][2].update(corrector={"order": 2}), "last step has no evaluation"),
    (lambda d: d["steps"][1].update(prediction="eps"), "prediction='eps' is not allowed"),
    (lambda d: d["steps"][1].update(relaxation="bh3"), "relaxation='bh3' is not allowed"),
    (lambda d: d["steps"][1].update(ordr=2), "unknown key"),
    (lambda d: d["steps"][0].update(relaxation="linear"), "need order >= 2"),
    (lambda d: d.update(nfe=4), "nfe=4 does not match"),
    (lambda d: d.update(afs="mean_x0", nfe=2), "needs afs_mean"),
    (lambda d: d.update(version=2), "version=2"),
    (lambda d: d.update(t_end=150), "t_end=150.0 must be"),
    (lambda d: d["steps"][1].update(corrector={"order": 4}), "corrector.order=4 needs"),
    (lambda d: d.update(timesteps=[999, 500, "x"]), r"timesteps\[2\] must be"),
]


@pytest.mark.parametrize("edit, message", BAD, ids=[m for _, m in BAD])
def test_invalid_schedules_name_the_field(edit, message):
    USFSchedule.from_dict(_good())
    d = _good()
    edit(d)
    with pytest.raises(ValueError, match=message):
        USFSchedule.from_dict(d)


def test_v3_without_ems_and_times_outside_the_range():
    d = _good()
    d["steps"][1]["prediction"] = "v3"
    with pytest.raises(ValueError, match="no EMS were given"):
        USFScheduler.from_config(SD, schedule=d)
    d = _good()
    d["timesteps"] = [1200, 500, 100]
    with pytest.raises(ValueError, match=r"timesteps\[0\]=1200.0 is outside"):
        USFScheduler.from_config(SD, schedule=d)
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped name"):
        USFScheduler.from_config(SD, schedule="no-such-schedule.json")


def test_json_round_trip_is_readable_and_exact(tmp_path):
    s = _afs_schedule("mean_x0", [0.1] * 16)
    s.info = {"note": "test"}
    text = s.to_json()
    assert '"timesteps": [999.0, 700.0, 400.0, 150.0, 30.0]' in text
    assert '{"prediction": "noise", "order": 3, "points": [1, 2], "corrector": {"order": 3, "relaxation": ' \
           '"unipc-bh2"}}' in text
    back = USFSchedule.load(s.save(tmp_path / "x.json"))
    assert back.to_dict() == s.to_dict() and back.key() == s.key()
    assert back.nfe == 4
    assert np.allclose(back.afs_mean, 0.1)


# ------------------------------------------------------------------------------ the shipped schedules
def test_shipped_schedules_load_run_and_match_configs():
    """configs/usf/*.json and the package-data copies are the same bytes; every shipped schedule
    loads by its short name, has the NFE and guidance its name says, and runs in the digits pipeline
    at that NFE (with its EMS, when it has v3 steps)."""
    from pathlib import Path

    from fewstep.models import load_digits_pipeline, shipped_file
    from fewstep.samplers import EMS
    from fewstep.samplers.usf_schedule import ems_fingerprint

    configs = Path(__file__).resolve().parent.parent / "configs" / "usf"
    assert sorted(p.name for p in configs.glob("*.json")) == sorted(f.removeprefix("usf_") for f in SHIPPED.values())
    pipe = load_digits_pipeline()
    for name, file in SHIPPED.items():
        assert shipped_file(file).read_bytes() == (configs / file.removeprefix("usf_")).read_bytes(), name
        s = USFSchedule.load(name)
        nfe, w = int(name.rsplit("nfe", 1)[1]), 2.0 if "cfg2" in name else 1.0
        assert s.nfe == nfe and s.info["guidance_scale"] == w and s.info["model"] == "digits", name
        if s.uses_v3:
            if s.ems["sha256"] != ems_fingerprint(EMS.load(s.ems["name"])):
                pytest.skip(f"the shipped EMS {s.ems['name']!r} changed since the USF searches: re-run "
                            "`python benchmarks/usf_search.py --part ship`")
        pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, schedule=name)
        out = pipe([0, 9], num_inference_steps=nfe, guidance_scale=w, output_type="pt",
                   generator=torch.Generator().manual_seed(0))
        assert out.nfe == nfe * (2 if w > 1 else 1) and torch.isfinite(out.images).all(), name


def test_a_diffusers_pipeline_runs_an_afs_schedule_with_cfg():
    """StableDiffusionPipeline (tiny, random weights) with classifier-free guidance: the analytical
    first step happens in scale_model_input on the doubled CFG batch, the UNet runs once per NFE, and
    the latents equal fewstep.sample's over the same UNet."""
    from tiny_pipelines import SD_SCHEDULER_CONFIG, sd_inputs, tiny_sd

    pipe = tiny_sd()
    s = USFSchedule((999.0, 800.0, 500.0, 200.0), (USFStep(), multistep_step("data", 2),
                    multistep_step("noise", 2, corrector=USFCorrector(3)), USFStep()), afs="zero_x0")
    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, schedule=s)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    inputs = sd_inputs()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(**inputs, num_inference_steps=3, guidance_scale=4.0, latents=latents, output_type="latent").images
    hook.remove()
    assert len(calls) == 3 and torch.isfinite(out).all()
    cond, uncond = inputs["prompt_embeds"], inputs["negative_prompt_embeds"]

    def model(x, t, c):
        return pipe.unet(x, t, encoder_hidden_states=c).sample

    usf = USFScheduler.from_config(SD_SCHEDULER_CONFIG, schedule=s)
    with torch.no_grad():
        want, nfe = sample(model, latents, usf, guidance=4.0, cond=cond, uncond=uncond)
    assert nfe == 6
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
