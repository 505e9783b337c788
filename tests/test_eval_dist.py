"""Two CPU processes under ``accelerate launch`` shard images and gather the same features.

Runs the real CLI in fresh processes (forking a process that already started torch's thread
pools, as ``accelerate.debug_launcher`` does, can hang).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_eval_common import tiny_trunk_file, write_images

from fewstep.eval.features import extract_features
from fewstep.eval.frechet import FeatureStats
from fewstep.eval.images import FileImageSource
from fewstep.eval.inception import InceptionFeatures

pytestmark = pytest.mark.slow  # multi-process launches (~11 s each)


def _launch_two(*cli_args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 CPU processes of ``python -m fewstep.apps.cli CLI_ARGS``."""
    with socket.socket() as sock:  # a free rendezvous port: never collide with another launch
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port),
           "-m", "fewstep.apps.cli", *cli_args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"world_size": 2' in proc.stdout
    return proc


def test_accelerate_two_processes_gather_equals_single_process(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 11, seed=0)  # odd count: uneven shards
    w = tiny_trunk_file(tmp_path)
    out = tmp_path / "two.npz"
    _launch_two("eval", "stats", str(folder), str(out), "--keep-features", "--device", "cpu", "--batch-size", "3",
                "--inception-weights", str(w), "--no-progress", "--json")  # fmt: skip

    single = extract_features(FileImageSource(folder), InceptionFeatures(w), keep_features=True, progress=False)
    with np.load(out) as z:
        feats = torch.from_numpy(z["feats"])
    torch.testing.assert_close(feats, single.features, rtol=0, atol=1e-6)
    two = FeatureStats.load(out)
    assert two.n == 11
    assert not list(tmp_path.glob("two.npz.partial*"))  # both ranks' checkpoints removed after the write
    torch.testing.assert_close(two.mean, single.stats.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(two.cov, single.stats.cov, rtol=1e-8, atol=1e-10)


def test_accelerate_two_processes_fd_digits_equals_single_process(tmp_path):
    """fd-digits under 2 processes: 11 good digits + 1 unreadable file (--skip-bad), so the shards
    are uneven (6 + 5) and labels must follow the skipped slot; FD and accuracy equal the
    single-process :func:`fd_digits` and each process embedded only its share."""
    pytest.importorskip("fewstep.models.classifier")
    from PIL import Image

    from fewstep.eval.fd_digits import digits_reference_images, fd_digits

    imgs, labels = digits_reference_images(16, split="train")
    imgs, labels = imgs[:11], labels[:11]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(11):
        Image.fromarray(imgs[i, 0].numpy()).save(folder / f"d{i:02d}.png")
    (folder / "d05b.png").write_text("not an image")  # file 6 of 12 in sorted order
    lines = [int(v) for v in labels[:6]] + [9] + [int(v) for v in labels[6:]]  # the bad file keeps its line
    (tmp_path / "labels.txt").write_text("\n".join(map(str, lines)) + "\n")
    proc = _launch_two("eval", "fd-digits", str(folder), "--labels", str(tmp_path / "labels.txt"), "--skip-bad",
                       "--device", "cpu", "--batch-size", "3", "--no-progress", "--json")  # fmt: skip
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    single = fd_digits(imgs, labels)
    assert res["gen"]["n"] == 11 and res["gen"]["skipped"] == ["d05b.png"]
    assert res["gen"]["per_process"] == [6, 5]  # sharded, not computed twice
    assert res["value"] == pytest.approx(single["fd"], rel=1e-6, abs=1e-9)
    assert res["accuracy"] == single["accuracy"]
