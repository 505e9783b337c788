"""Frechet distance, feature statistics and KID against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from fewstep.eval.frechet import FeatureStats, check_sample_size, fid_from_stats, frechet_distance
from fewstep.eval.metrics import kernel_inception_distance


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("n", [200, 20])  # full rank and rank-deficient (n < d)
def test_frechet_matches_scipy_sqrtm_and_torchmetrics(n):
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(size=(n, 32)) * 1.5 + 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)
    tm = _compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))).item()
    assert ours == pytest.approx(tm, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7 * np.trace(s1))  # sqrt of ~0 eigenvalues


def test_frechet_rejects_bad_shapes_and_types():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(TypeError, match="mu1"):
        frechet_distance([0, 0], np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_streaming_stats_equal_numpy_cov_and_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    f = torch.from_numpy(rng.normal(size=(57, 9)).astype(np.float32))
    st = FeatureStats(dim=9, meta={"extractor": "x", "preprocess": "tf"})
    for chunk in f.split(10):  # batches of unequal size
        st.update(chunk)
    np.testing.assert_allclose(st.mean.numpy(), f.double().mean(0).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.cov.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    st.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 57 and back.meta == st.meta
    np.testing.assert_allclose(back.cov.numpy(), st.cov.numpy(), rtol=1e-10, atol=1e-12)
    with np.load(tmp_path / "s.npz") as z:  # readable by tools expecting mu/sigma
        assert set(z.files) >= {"mu", "sigma", "n", "meta"}


def test_refuses_statistics_of_other_extractor_or_preprocessing():
    rng = np.random.default_rng(1)
    f = torch.from_numpy(rng.normal(size=(30, 4)))
    a = FeatureStats.from_features(f, {"extractor": "inception", "preprocess": "tf"})
    b = FeatureStats.from_features(f, {"extractor": "inception", "preprocess": "clean"})
    c = FeatureStats.from_features(f, {"extractor": "other", "preprocess": "tf"})
    with pytest.raises(ValueError, match="preprocess"):
        a.frechet_distance(b)
    with pytest.raises(ValueError, match="extractor"):
        a.frechet_distance(c)
    assert a.frechet_distance(a) == pytest.approx(0.0, abs=1e-9)
    with pytest.warns(UserWarning, match="cannot verify"):
        a.frechet_distance(FeatureStats.from_features(f))


def test_sample_size_checks():
    with pytest.raises(ValueError, match="at least 2"):
        check_sample_size(1, 8)
    with pytest.warns(UserWarning, match="biased"):
        check_sample_size(5, 8)
    f = torch.randn(1, 4, dtype=torch.float64)
    one = FeatureStats.from_features(f)
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_stats(one, FeatureStats.from_features(torch.randn(10, 4)))


def _numpy_kid(x, y, degree=3, coef=1.0):
    # unbiased MMD^2 with the polynomial kernel, written independently of torchmetrics
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + coef) ** degree  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_full_subset_matches_independent_formula_and_is_seeded():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.5
    m, s = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=3, subset_size=40)
    assert m == pytest.approx(_numpy_kid(x, y), rel=1e-9) and s == pytest.approx(0.0, abs=1e-9)
    r1 = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=5, subset_size=10, seed=3)
    r2 = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=5, subset_size=10, seed=3)
    assert r1 == r2
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subset_size=41)
