"""The UNet adapter ``fewstep.models.denoiser`` and the one sampling loop behind the digits pipeline."""

import pytest
import torch
from diffusers import DDIMScheduler

import fewstep
from fewstep.guidance import APG, CFG, CFGPlusPlus
from fewstep.models import denoiser, load_digits_pipeline
from fewstep.models.pipeline import NULL_CLASS
from fewstep.samplers import DPMSolverPPScheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_digits_pipeline()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_adapter_is_the_unet_call_with_the_null_class_named_once(pipe):
    unet = pipe.unet
    den = denoiser(unet, null_class=NULL_CLASS)
    x = torch.randn(4, 1, 8, 8, generator=_gen())
    y = torch.tensor([0, 3, 5, 9])
    t = torch.tensor(500)
    with torch.no_grad():
        want = unet(x, t.expand(4), class_labels=y).sample
        assert torch.equal(den(x, t, y), want)
        assert torch.equal(den(x, 500, y), want)  # a plain number is the same timestep
        # an int condition is that class for every row; null() is the null class
        assert torch.equal(den(x, t, 3), unet(x, t.expand(4), class_labels=torch.full((4,), 3)).sample)
        assert torch.equal(den.null(y), torch.full_like(y, 10)) and den.null() == 10
        # one batched call for both branches: the diffusers-pipeline layout, bit for bit
        c, u = den.evaluate_pair(x, t, y, den.null(y))
        both = unet(torch.cat([x, x]), t.expand(8), class_labels=torch.cat([y, torch.full_like(y, 10)])).sample
        assert torch.equal(c, both[:4]) and torch.equal(u, both[4:])
        # ... and the separate calls up to float32 round-off of the other batch size
        torch.testing.assert_close(c, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(u, den(x, t, 10), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="null_class"):
        denoiser(unet).null(y)
    with pytest.raises(ValueError, match="null_class must be an int"):
        denoiser(unet, null_class="10")
    with pytest.raises(TypeError, match="condition must be"):
        den(x, t, "three")


def test_guided_steps_batch_both_branches_through_the_adapter(pipe):
    """fewstep.sample with a number or a Guidance evaluates cond + uncond in ONE UNet call per step
    when the model is the adapter, two calls with a plain callable; the results agree to round-off."""
    unet = pipe.unet
    calls = []
    hook = unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        den = denoiser(unet, NULL_CLASS)
        y = torch.arange(6) % 10
        noise = torch.randn(6, 1, 8, 8, generator=_gen(1))
        sched = DPMSolverPPScheduler.from_config(pipe.scheduler.config)
        with torch.no_grad():
            x_pair, nfe = fewstep.sample(den, noise, sched, 3, guidance=2.0, cond=y, uncond=den.null(y))
            assert nfe == 6 and calls == [12, 12, 12]
            calls.clear()
            x_sep, nfe = fewstep.sample(lambda x, t, c: unet(x, t, class_labels=c).sample, noise, sched, 3,
                                        guidance=2.0, cond=y, uncond=den.null(y))
            assert nfe == 6 and calls == [6] * 6
            torch.testing.assert_close(x_pair, x_sep, rtol=0, atol=1e-4)
            calls.clear()
            fewstep.sample(den, noise, sched, 3, guidance=1.0, cond=y, uncond=den.null(y))
            assert calls == [6, 6, 6]  # w = 1: the conditional branch only
    finally:
        hook.remove()


def test_pipeline_is_fewstep_sample(pipe):
    """DigitsPipeline's images are fewstep.sample's over the adapter, for CFG and guidance objects."""
    labels = [1, 4, 7]
    lat = torch.randn(3, 1, 8, 8, generator=_gen(2))
    den = denoiser(pipe.unet, NULL_CLASS)
    y = torch.tensor(labels)
    for kw, rule, sched in [({"guidance_scale": 2.5}, CFG(2.5), DDIMScheduler),
                            ({"guidance": APG(3.0, momentum=-0.5)}, APG(3.0, momentum=-0.5), DPMSolverPPScheduler),
                            ({"guidance": CFGPlusPlus(0.6)}, CFGPlusPlus(0.6), DPMSolverPPScheduler)]:
        p = type(pipe)(unet=pipe.unet, scheduler=sched.from_config(pipe.scheduler.config))
        p.set_progress_bar_config(disable=True)
        out = p(labels, num_inference_steps=4, latents=lat, output_type="pt", **kw)
        with torch.no_grad():
            x, nfe = fewstep.sample(den, lat, sched.from_config(pipe.scheduler.config), 4, guidance=rule, cond=y,
                                    uncond=den.null(y))
        assert torch.equal(out.images, ((x.clamp(-1, 1) + 1) / 2)), kw
        assert out.nfe == nfe == 8
    with pytest.raises(ValueError, match="guidance must be"):
        pipe(labels, guidance=3.0)


def test_cfg_needs_no_noise_level_from_the_scheduler():
    """A number as guidance is CFG(w), which is linear in the raw output: it runs with a scheduler
    that exposes no noise schedule at all (as the loop with the formula inline did)."""

    class Halving:  # a minimal scheduler: no config, no alphas
        def set_timesteps(self, n, device=None):
            self.timesteps = torch.arange(n, 0, -1)

        def step(self, out, t, x, return_dict=False):
            return (x - 0.5 * out,)

    def model(x, t, c):
        return x * (2.0 if c == "c" else 1.0)

    x, nfe = fewstep.sample(model, torch.ones(2, 3), Halving(), 2, guidance=3.0, cond="c", uncond="u")
    # per step: out = u + 3 (c - u) = x (1 + 3) -> x - 2x = -x
    assert nfe == 4 and torch.equal(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fewstep.sample(model, torch.ones(2, 3), Halving(), 2, guidance=float("nan"), cond="c", uncond="u")
