"""fewstep.sample checks its inputs and the model's outputs itself (issue 11): guidance given as a
spec string, NaN/inf in the starting noise (the input's fault), NaN/inf in the model output with
any scheduler (diffusers' too, and fewstep's with check_finite=False), non-finite guidance
scales. Also: a folder written by ``DigitsPipeline.save_pretrained`` loads as ``--model``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import fewstep
from fewstep.guidance import CFG
from fewstep.samplers import DPMSolverPPScheduler
from fewstep.testing import GaussianMixtureModel, make_gaussian_mixture

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
MIX = make_gaussian_mixture(dim=8, num_components=3, num_classes=2, seed=5)


def _model():
    return GaussianMixtureModel(MIX, DPMSolverPPScheduler(**SD).schedule, "epsilon")


def _noise(b=4):
    return torch.randn(b, 8, generator=torch.Generator().manual_seed(1))


def test_guidance_spec_string_equals_the_object():
    model, noise, c = _model(), _noise(), torch.tensor([0, 1, 0, 1])
    want, nfe_want = fewstep.sample(model, noise, DPMSolverPPScheduler(**SD), 6, guidance=CFG(2.5), cond=c, uncond=-1)
    got, nfe = fewstep.sample(model, noise, DPMSolverPPScheduler(**SD), 6, guidance="cfg:2.5", cond=c, uncond=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert nfe == nfe_want == 12
    for bad, msg in (("cfgg:2", "unknown"), ("cfg:abc", "finite number"), ("apg:foo=1", "'foo' is not accepted")):
        with pytest.raises(ValueError, match=msg) as info:
            fewstep.sample(model, noise, DPMSolverPPScheduler(**SD), 6, guidance=bad, cond=c, uncond=-1)
        assert "guidance" in str(info.value)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_guidance_scale_is_refused(scale):
    model = _model()
    with pytest.raises(ValueError, match="guidance scale must be a finite number"):
        fewstep.sample(model, _noise(), DPMSolverPPScheduler(**SD), 4, guidance=scale, cond=0, uncond=-1)
    assert model.nfe == 0


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_noise_is_the_inputs_fault(value):
    model = _model()
    noise = _noise()
    noise[1, 3] = value
    with pytest.raises(ValueError, match=r"noise \(the starting sample\) contains 1 NaN/inf value\(s\) of 32"):
        fewstep.sample(model, noise, DPMSolverPPScheduler(**SD), 4, cond=0)
    assert model.nfe == 0  # reported before the model ran


class _NaNAfter:
    """The mixture model, returning NaN in one entry from its ``after``-th call on."""

    def __init__(self, after: int, value=math.nan):
        self.model, self.after, self.value, self.calls = _model(), after, value, 0

    def __call__(self, x, t, c):
        self.calls += 1
        out = self.model(x, t, c)
        if self.calls > self.after:
            out = out.clone()
            out[0, 0] = self.value
        return out


@pytest.mark.parametrize("make", [
    lambda: DDIMScheduler(**SD),
    lambda: DPMSolverMultistepScheduler(**SD),
    lambda: DPMSolverPPScheduler(**SD, check_finite=False),
])
def test_nan_model_output_is_caught_with_any_scheduler(make):
    model = _NaNAfter(after=2)
    with pytest.raises(FloatingPointError, match=r"model output at step 2 \(timestep \d+\) has 1 non-finite value"
                                                 r"\(s\) of 32 \(1 NaN, 0 inf\)"):
        fewstep.sample(model, _noise(), make(), 5, cond=0)
    model = _NaNAfter(after=1, value=math.inf)
    with pytest.raises(FloatingPointError, match=r"model output at step 1 .*\(0 NaN, 1 inf\)"):
        fewstep.sample(model, _noise(), make(), 5, cond=0)
    model = _NaNAfter(after=3)
    with pytest.raises(FloatingPointError, match=r"model output \(after guidance\) at step 1 "):
        fewstep.sample(model, _noise(), make(), 5, guidance=2.0, cond=0, uncond=-1)


def test_non_finite_sample_from_the_scheduler_is_named():
    class Exploding(DDIMScheduler):
        def step(self, model_output, timestep, sample, **kw):
            out = super().step(model_output, timestep, sample, **kw)
            return (out[0] * math.inf,)

    with pytest.raises(FloatingPointError, match=r"sample returned by Exploding.step at step 0"):
        fewstep.sample(_model(), _noise(), Exploding(**SD), 3, cond=0)


def test_save_pretrained_digits_folder_loads_as_model(tmp_path):
    """``DigitsPipeline.save_pretrained`` output is a ``--model`` folder: same images as 'digits'."""
    from fewstep.apps.generate import generate
    from fewstep.apps.loading import load_model
    from fewstep.models import load_digits_pipeline

    with fewstep.testing.one_thread():
        load_digits_pipeline().save_pretrained(tmp_path / "digits")
        folder = load_model(str(tmp_path / "digits"), "cpu", cache=False)
        assert folder.kind == "digits" and type(folder.pipe).__name__ == "DigitsPipeline"
        a = generate(folder, "dpmpp-2m", 3, "cfg:2", seed=3, n=2, labels="4,7")
        b = generate(load_model("digits", "cpu", cache=False), "dpmpp-2m", 3, "cfg:2", seed=3, n=2, labels="4,7")
    assert a.nfe == b.nfe == 6 and a.settings["labels"] == [4, 7]
    for p, q in zip(a.images, b.images):
        assert np.array_equal(np.asarray(p), np.asarray(q))
