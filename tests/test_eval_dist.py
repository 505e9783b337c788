"""Two CPU processes under ``accelerate launch`` shard images and gather the same features.

Runs the real CLI in fresh processes (forking a process that already started torch's thread
pools, as ``accelerate.debug_launcher`` does, can hang).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import torch
from test_eval_common import tiny_trunk_file, write_images

from fewstep.eval.features import extract_features
from fewstep.eval.frechet import FeatureStats
from fewstep.eval.images import FileImageSource
from fewstep.eval.inception import InceptionFeatures


def test_accelerate_two_processes_gather_equals_single_process(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 11, seed=0)  # odd count: uneven shards
    w = tiny_trunk_file(tmp_path)
    out = tmp_path / "two.npz"
    with socket.socket() as sock:  # a free rendezvous port: never collide with another launch
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port),
           "-m", "fewstep.apps.cli", "eval", "stats", str(folder), str(out), "--keep-features",
           "--device", "cpu", "--batch-size", "3", "--inception-weights", str(w),
           "--no-progress", "--json"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"world_size": 2' in proc.stdout

    single = extract_features(FileImageSource(folder), InceptionFeatures(w), keep_features=True, progress=False)
    with np.load(out) as z:
        feats = torch.from_numpy(z["feats"])
    torch.testing.assert_close(feats, single.features, rtol=0, atol=1e-6)
    two = FeatureStats.load(out)
    assert two.n == 11
    torch.testing.assert_close(two.mean, single.stats.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(two.cov, single.stats.cov, rtol=1e-8, atol=1e-10)
