"""Two CPU processes (accelerate's debug launcher) shard images and gather the same features."""

from __future__ import annotations

import pickle

import torch
from test_eval_common import tiny_trunk_file, write_images


def _worker(folder: str, weights: str, out: str) -> None:
    from accelerate import PartialState

    from fewstep.eval.features import extract_features
    from fewstep.eval.images import FileImageSource
    from fewstep.eval.inception import InceptionFeatures

    state = PartialState(cpu=True)
    res = extract_features(
        FileImageSource(folder),
        InceptionFeatures(weights),
        batch_size=3,
        device="cpu",
        keep_features=True,
        progress=False,
    )
    with open(f"{out}.{state.process_index}", "wb") as f:
        pickle.dump((state.num_processes, res.features, res.stats.n, res.stats.sum, res.stats.sum_outer), f)


def test_two_processes_gather_equals_single_process(tmp_path):
    from accelerate import debug_launcher

    from fewstep.eval.features import extract_features
    from fewstep.eval.images import FileImageSource
    from fewstep.eval.inception import InceptionFeatures

    folder = tmp_path / "imgs"
    write_images(folder, 11, seed=0)  # odd count: uneven shards
    w = tiny_trunk_file(tmp_path)
    debug_launcher(_worker, args=(str(folder), str(w), str(tmp_path / "res")), num_processes=2)
    single = extract_features(FileImageSource(folder), InceptionFeatures(w), keep_features=True, progress=False)
    for rank in (0, 1):
        with open(tmp_path / f"res.{rank}", "rb") as f:
            world, feats, n, s, so = pickle.load(f)
        assert world == 2 and n == 11
        torch.testing.assert_close(feats, single.features, rtol=0, atol=1e-6)
        torch.testing.assert_close(s, single.stats.sum, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(so, single.stats.sum_outer, rtol=1e-12, atol=1e-9)
