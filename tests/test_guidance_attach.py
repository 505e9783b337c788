"""``fewstep.guidance.attach`` on tiny random SD / SDXL / SD img2img / SD3 pipelines: the hooked
pipeline must give what ``fewstep.sample`` gives with the same components and guidance."""

import pytest
import torch

from fewstep.guidance import APG, CFG, AdaptiveGuidance, CFGPlusPlus, GuidanceRescale, attach
from fewstep.sample import sample
from fewstep.samplers import DPMSolverPPScheduler

tp = pytest.importorskip("tests.tiny_pipelines")

STEPS = 4
TOL = dict(rtol=1e-4, atol=1e-4)  # batched vs per-branch UNet passes differ by float32 rounding


def _latents(pipe, batch, size, seed=5):
    ch = 4
    return torch.randn(batch, ch, size, size, generator=torch.Generator().manual_seed(seed))


def _fewstep_sched(pipe, **kw):
    pipe.scheduler = DPMSolverPPScheduler.from_config(pipe.scheduler.config, **kw)
    return DPMSolverPPScheduler.from_config(pipe.scheduler.config, **kw)


def test_sd_apg_batch_and_images_per_prompt_and_detach():
    pipe = tp.tiny_sd()
    sched = _fewstep_sched(pipe)
    kw = tp.sd_inputs(batch=1)
    n_img = 2
    lat = _latents(pipe, 2, 32)
    call = dict(num_inference_steps=STEPS, guidance_scale=3.0, latents=lat, num_images_per_prompt=n_img,
                output_type="latent")
    plain = pipe(**kw, **call).images
    handle = attach(pipe, APG(5.0, momentum=-0.5, norm_threshold=20.0))
    out = pipe(**kw, **call).images
    assert handle.nfe == 2 * STEPS
    # a second generation resets the momentum: same result
    torch.testing.assert_close(pipe(**kw, **call).images, out, rtol=0, atol=0)
    handle.detach()
    assert "forward" not in vars(pipe.unet) and not hasattr(pipe, "_fewstep_guidance")
    assert torch.equal(pipe(**kw, **call).images, plain)
    unet = pipe.unet
    model = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
    cond = kw["prompt_embeds"].repeat_interleave(n_img, 0)
    uncond = kw["negative_prompt_embeds"].repeat_interleave(n_img, 0)
    ref, nfe = sample(model, lat, sched, STEPS, guidance=APG(5.0, momentum=-0.5, norm_threshold=20.0), cond=cond,
                      uncond=uncond)
    assert nfe == 2 * STEPS
    torch.testing.assert_close(out, ref, **TOL)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_sd_cfg_hook_equals_pipeline_cfg_and_rejects_guidance_rescale():
    pipe = tp.tiny_sd(scheduler="ddim")
    kw = tp.sd_inputs(batch=1)
    lat = _latents(pipe, 1, 32)
    plain = pipe(**kw, num_inference_steps=STEPS, guidance_scale=4.0, latents=lat, output_type="latent").images
    handle = attach(pipe, CFG(4.0))
    out = pipe(**kw, num_inference_steps=STEPS, guidance_scale=1.5, latents=lat, output_type="latent").images
    torch.testing.assert_close(out, plain, **TOL)
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe(**kw, num_inference_steps=STEPS, guidance_scale=4.0, guidance_rescale=0.7, latents=lat,
             output_type="latent")
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(**kw, num_inference_steps=STEPS, guidance_scale=1.0, latents=lat, output_type="latent")
    handle.detach()


def test_sdxl_adaptive_guidance_skips_uncond_and_matches_sample():
    pipe = tp.tiny_sdxl()
    sched = _fewstep_sched(pipe)
    kw = tp.sdxl_inputs(batch=2)
    lat = _latents(pipe, 2, 32)
    steps = 6
    handle = attach(pipe, AdaptiveGuidance(3.0, threshold=0.0, min_step=2))  # switches at step 2
    out = pipe(**kw, num_inference_steps=steps, guidance_scale=3.0, latents=lat, output_type="latent").images
    assert handle.nfe == 2 * 3 + (steps - 3)
    handle.detach()
    unet = pipe.unet
    ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(2, 1)  # what the pipeline passes

    def model(x, t, c):
        return unet(x, t, encoder_hidden_states=c[0], added_cond_kwargs={"text_embeds": c[1], "time_ids": ids}).sample

    cond = (kw["prompt_embeds"], kw["pooled_prompt_embeds"])
    uncond = (kw["negative_prompt_embeds"], kw["negative_pooled_prompt_embeds"])
    ag = AdaptiveGuidance(3.0, threshold=0.0, min_step=2)
    ref, nfe = sample(model, lat, sched, steps, guidance=ag, cond=cond, uncond=uncond)
    assert nfe == handle.nfe
    torch.testing.assert_close(out, ref, **TOL)


def test_sd_img2img_cfgpp_matches_sample_and_needs_renoise_scheduler():
    pipe = tp.tiny_sd_img2img()
    with pytest.raises(ValueError, match="renoise"):
        attach(pipe, CFGPlusPlus(0.6))  # PNDM cannot renoise
    sched = _fewstep_sched(pipe, solver_order=1)
    kw = tp.sd_img2img_inputs(batch=1, strength=0.75)
    steps = 8
    g = torch.Generator().manual_seed(0)
    plain = pipe(**kw, num_inference_steps=steps, guidance_scale=2.0, generator=g, output_type="latent").images
    handle = attach(pipe, CFGPlusPlus(0.6))
    out = pipe(**kw, num_inference_steps=steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    assert handle.nfe == 2 * 6
    handle.detach()
    assert "step" not in vars(pipe.scheduler)
    # reproduce: encode the image and noise it exactly as the pipeline does, then sample the tail
    sched.set_timesteps(steps)
    t_start = sched.timesteps[steps - 6:]
    image = pipe.image_processor.preprocess(kw["image"])
    gen = torch.Generator().manual_seed(0)
    init = pipe.vae.encode(image).latent_dist.sample(gen) * pipe.vae.config.scaling_factor
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(init.shape, generator=gen)
    sched.set_begin_index(steps - 6)
    x = sched.add_noise(init, noise, t_start[:1])
    unet = pipe.unet
    model = lambda x_, t, c: unet(x_, t, encoder_hidden_states=c).sample  # noqa: E731
    ref, _ = sample(model, x, sched, timesteps=t_start.tolist(), guidance=CFGPlusPlus(0.6), cond=kw["prompt_embeds"],
                    uncond=kw["negative_prompt_embeds"])
    torch.testing.assert_close(out, ref, **TOL)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_sd3_rescaled_apg_matches_sample():
    pipe = tp.tiny_sd3()
    sched = _fewstep_sched(pipe)
    kw = tp.sd3_inputs(batch=2)
    lat = _latents(pipe, 2, 16)
    guidance = GuidanceRescale(0.5, guidance=APG(4.0, momentum=-0.5), space="x0")
    handle = attach(pipe, guidance)
    out = pipe(**kw, num_inference_steps=STEPS, guidance_scale=2.0, latents=lat, output_type="latent").images
    assert handle.nfe == 2 * STEPS
    handle.detach()
    tr = pipe.transformer

    def model(x, t, c):
        return tr(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=c[0],
                  pooled_projections=c[1]).sample

    ref, nfe = sample(model, lat, sched, STEPS, guidance=guidance,
                      cond=(kw["prompt_embeds"], kw["pooled_prompt_embeds"]),
                      uncond=(kw["negative_prompt_embeds"], kw["negative_pooled_prompt_embeds"]))
    assert nfe == 2 * STEPS
    torch.testing.assert_close(out, ref, **TOL)
