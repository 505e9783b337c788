"""DPMSolverPPScheduler inside real diffusers pipelines (tiny random models built from configs):
SD, SDXL, SD img2img (begin index) and SD3 give the same latents as diffusers'
DPMSolverMultistepScheduler where the settings coincide; save/load round trips; Karras and
singlestep configurations run and behave."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from tiny_pipelines import (
    sd3_inputs,
    sd_img2img_inputs,
    sd_inputs,
    sdxl_inputs,
    tiny_sd,
    tiny_sd3,
    tiny_sd_img2img,
    tiny_sdxl,
)

from fewstep.samplers import DPMSolverPPScheduler

TOL = 1e-4  # max abs latent difference for "same result" (latents are O(1..5), float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl()


@pytest.fixture(scope="module")
def img2img():
    return tiny_sd_img2img()


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3()


def _run(pipe, scheduler, kwargs, steps, guidance=5.0, **extra):
    """Latents of one generation with ``scheduler`` swapped in (seeded generator)."""
    shipped = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        out = pipe(
            **kwargs,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **extra,
        ).images
    finally:
        pipe.scheduler = shipped
    return out


def _both(pipe, extra_cfg, kwargs, steps, **call):
    """(fewstep, diffusers) latents with DPMSolverPP / DPMSolverMultistep built from the pipeline's
    shipped scheduler config plus ``extra_cfg``."""
    cfg = pipe.scheduler.config
    ours = _run(pipe, DPMSolverPPScheduler.from_config(cfg, **extra_cfg), kwargs, steps, **call)
    ref = _run(pipe, DPMSolverMultistepScheduler.from_config(cfg, **extra_cfg), kwargs, steps, **call)
    return ours, ref


CONFIGS = [
    {},  # 2M midpoint, the diffusers default
    {"solver_order": 3},
    {"solver_order": 1},
    {"use_karras_sigmas": True},
    {"use_lu_lambdas": True, "solver_type": "heun"},
    {"timestep_spacing": "trailing"},
    {"algorithm_type": "sde-dpmsolver++"},  # same generator -> same noise as diffusers
]


@pytest.mark.parametrize("extra", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "2M")
def test_sd_matches_diffusers(sd, extra):
    ours, ref = _both(sd, extra, sd_inputs(), 6)
    assert ours.shape == ref.shape == (1, 4, 16, 16)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("extra", [{}, {"solver_order": 3, "use_karras_sigmas": True}], ids=["2M", "3M-karras"])
def test_sdxl_matches_diffusers(sdxl, extra):
    ours, ref = _both(sdxl, extra, sdxl_inputs(), 6)
    assert ours.shape == (1, 4, 16, 16)
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("strength,begin", [(0.6, 4), (0.3, 7)])
def test_img2img_matches_diffusers_and_sets_begin_index(img2img, strength, begin):
    """10 steps at strength s run the last int(10 s) steps: the pipeline calls set_begin_index(10 - int(10 s))
    and add_noise at that point; both must agree with diffusers."""
    kw = sd_img2img_inputs(strength=strength)
    ours_s = DPMSolverPPScheduler.from_config(img2img.scheduler.config)
    ref_s = DPMSolverMultistepScheduler.from_config(img2img.scheduler.config)
    ours = _run(img2img, ours_s, kw, 10)
    ref = _run(img2img, ref_s, kw, 10)
    assert ours_s.begin_index == ref_s.begin_index == begin
    assert ours_s.step_index == ref_s.step_index == 10
    assert (ours - ref).abs().max().item() < TOL
    # the begin index matters: a different strength is a different result
    other = _run(img2img, DPMSolverPPScheduler.from_config(img2img.scheduler.config), dict(kw, strength=0.9), 10)
    assert (other - ours).abs().max().item() > 1e-2


def test_sd_decodes_images(sd):
    pipe = sd
    shipped = pipe.scheduler
    pipe.scheduler = DPMSolverPPScheduler.from_config(shipped.config)
    try:
        img = pipe(**sd_inputs(), num_inference_steps=4, guidance_scale=5.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.scheduler = shipped
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all() and 0 <= img.min() <= img.max() <= 1


# ------------------------------------------------------------------------------------------------
# SD3 (flow matching)
# ------------------------------------------------------------------------------------------------
# diffusers' DPMSolverMultistepScheduler with use_flow_sigmas computes the same sigmas as fewstep but
# truncates the model times ``1000 * sigma`` to int64, while fewstep (like FlowMatchEuler) passes the
# exact float time to the transformer. The solver math is therefore compared in two honest ways:
#   1. against diffusers' DPMSolverMultistep whose timesteps are replaced by the untruncated
#      ``1000 * sigmas`` (nothing else changed): same model inputs -> same latents, every order;
#   2. order 1 in flow coordinates is exactly the Euler step of FlowMatchEulerDiscreteScheduler
#      (x_t = x_s + (s_t - s_s) u  <=>  DPM-Solver++(1) with alpha = 1 - s): on FlowMatchEuler's own
#      grid (passed as ``sigmas=``), fewstep order 1 must reproduce the SD3 pipeline's shipped sampler.
FLOW_KW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}


class _FloatTimesDPM(DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistep with the flow model times left as floats (test helper)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        if self.config.use_flow_sigmas:
            self.timesteps = (self.sigmas[:-1].double() * self.config.num_train_timesteps).float()


def test_sd3_from_config_is_flow_and_times_are_untruncated(sd3):
    ours = DPMSolverPPScheduler.from_config(sd3.scheduler.config)
    assert ours.schedule.kind == "flow" and ours.config.prediction_type == "flow_prediction"
    assert ours.config.flow_shift == 3.0
    ref = DPMSolverMultistepScheduler.from_config(sd3.scheduler.config, **FLOW_KW)
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    torch.testing.assert_close(ours.sigmas, ref.sigmas)
    diff = ours.timesteps - ref.timesteps.float()
    assert ((diff >= 0) & (diff < 1)).all()  # diffusers' int64 times are ours truncated
    assert (diff > 0.01).any()  # ... and the truncation is real


@pytest.mark.parametrize("order", [1, 2, 3])
def test_sd3_matches_diffusers_dpmsolver_with_float_times(sd3, order):
    kw = sd3_inputs()
    ours = _run(sd3, DPMSolverPPScheduler.from_config(sd3.scheduler.config, solver_order=order), kw, 6)
    ref = _run(sd3, _FloatTimesDPM.from_config(sd3.scheduler.config, solver_order=order, **FLOW_KW), kw, 6)
    assert ours.shape == (1, 4, 16, 16) and torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() < TOL
    # the unmodified diffusers scheduler differs only through the truncated model times: close, not equal
    plain = DPMSolverMultistepScheduler.from_config(sd3.scheduler.config, solver_order=order, **FLOW_KW)
    trunc = _run(sd3, plain, kw, 6)
    assert 0 < (ours - trunc).abs().max().item() < 0.1 * ours.abs().max().item()


def test_sd3_order1_is_flowmatch_euler(sd3):
    kw = sd3_inputs()
    euler = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    ref = _run(sd3, euler, kw, 5)
    grid = euler.sigmas[:-1].tolist()  # FlowMatchEuler's shifted grid, without the final 0
    ours_s = DPMSolverPPScheduler.from_config(sd3.scheduler.config, solver_order=1)
    ours = _run(sd3, ours_s, kw, None, sigmas=grid)
    torch.testing.assert_close(ours_s.timesteps, euler.timesteps)
    assert (ours - ref).abs().max().item() < TOL


def test_sd3_in_memory_flowmatch_config_is_recognised():
    """A FlowMatchEuler scheduler constructed in code (not loaded from disk) has no ``_class_name`` in
    its config; DPMSolverPPScheduler.from_config must still see a flow-matching model."""
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    ours = DPMSolverPPScheduler.from_config(cfg)
    assert ours.schedule.kind == "flow"
    assert ours.config.prediction_type == "flow_prediction" and ours.schedule.shift == 3.0


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
def _public(cfg) -> dict:
    """A scheduler config without diffusers' bookkeeping keys (``_class_name``, ``_use_default_values``...)."""
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


def _round_trip_setup(sd, tmp_path):
    cfg = dict(use_karras_sigmas=True, solver_order=3, method="multistep", round_timesteps=False)
    sched = DPMSolverPPScheduler.from_config(sd.scheduler.config, **cfg)
    shipped = sd.scheduler
    sd.scheduler = sched
    try:
        sd.save_pretrained(tmp_path)
    finally:
        sd.scheduler = shipped
    return sched


def test_pipeline_save_keeps_scheduler_config(sd, tmp_path):
    sched = _round_trip_setup(sd, tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][1] == "DPMSolverPPScheduler"
    loaded = DPMSolverPPScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert type(loaded) is DPMSolverPPScheduler
    assert _public(loaded.config) == _public(sched.config)
    sched.set_timesteps(7)
    loaded.set_timesteps(7)
    assert torch.equal(loaded.timesteps, sched.timesteps) and torch.equal(loaded.sigmas, sched.sigmas)


def test_pipeline_from_pretrained_loads_dpmpp(sd, tmp_path):
    sched = _round_trip_setup(sd, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe.scheduler) is DPMSolverPPScheduler
    assert _public(pipe.scheduler.config) == _public(sched.config)


def test_sd3_pipeline_save_keeps_flow_scheduler(sd3, tmp_path):
    sched = DPMSolverPPScheduler.from_config(sd3.scheduler.config)
    shipped = sd3.scheduler
    sd3.scheduler = sched
    try:
        sd3.save_pretrained(tmp_path)
    finally:
        sd3.scheduler = shipped
    loaded = DPMSolverPPScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert _public(loaded.config) == _public(sched.config) and loaded.schedule.kind == "flow"
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][1] == "DPMSolverPPScheduler" and index["text_encoder_3"] == [None, None]


# ------------------------------------------------------------------------------------------------
# Karras / singlestep in the pipeline
# ------------------------------------------------------------------------------------------------
def _record_unet_times(pipe):
    """Install a pre-forward hook that records the timestep of every UNet call; returns (list, handle)."""
    seen = []

    def hook(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(float(torch.as_tensor(t).reshape(-1)[0]))

    return seen, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_runs_in_pipeline_and_beats_ddim(sd, order):
    """Singlestep DPM-Solver++ at 8 NFE: the UNet is called 8 times at exactly ``scheduler.timesteps``,
    and the result is closer to a 60-step 3M reference of the same pipeline ODE than DDIM's (all from
    t = 999 with time-uniform outer grids)."""
    kw = sd_inputs()
    cfg = dict(sd.scheduler.config, timestep_spacing="trailing", steps_offset=0)
    ref = _run(sd, DPMSolverPPScheduler.from_config(cfg, solver_order=3), kw, 60, guidance=3.0)
    ddim = _run(sd, DPMSolverPPScheduler.from_config(cfg, solver_order=1), kw, 8, guidance=3.0)
    sched = DPMSolverPPScheduler.from_config(cfg, method="singlestep", solver_order=order)
    seen, handle = _record_unet_times(sd)
    try:
        ours = _run(sd, sched, kw, 8, guidance=3.0)
    finally:
        handle.remove()
    assert len(seen) == len(sched.timesteps) == 8
    assert seen == [float(t) for t in sched.timesteps]
    err = (ours - ref).norm() / ref.norm()
    err_ddim = (ddim - ref).norm() / ref.norm()
    assert torch.isfinite(ours).all()
    assert err < 0.7 * err_ddim, (err.item(), err_ddim.item())  # measured: 2S 0.43x, 3S 0.13x


def test_karras_and_logsnr_spacings_run_in_pipeline(sd):
    """fewstep-only grids (no diffusers twin): they run, start at the top of the schedule and give
    finite latents close to the default grid's (same ODE, same start)."""
    kw = sd_inputs()
    cfg = dict(sd.scheduler.config, steps_offset=0)
    base = _run(sd, DPMSolverPPScheduler.from_config(cfg, timestep_spacing="linspace", solver_order=3), kw, 40)
    for spacing in ("karras", "logsnr"):
        sched = DPMSolverPPScheduler.from_config(cfg, timestep_spacing=spacing, round_timesteps=False)
        out = _run(sd, sched, kw, 10)
        assert sched.timesteps.dtype == torch.float32 and float(sched.timesteps[0]) == pytest.approx(999.0)
        assert torch.isfinite(out).all()
        assert ((out - base).norm() / base.norm()).item() < 0.05
