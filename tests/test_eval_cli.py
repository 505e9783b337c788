"""``fewstep eval`` end to end on small folders (a TorchScript stand-in keeps the Inception cheap)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_common import tiny_trunk_file, write_images

from fewstep.apps.cli import main
from fewstep.eval.frechet import FeatureStats
from fewstep.eval.images import FileImageSource
from fewstep.eval.inception import InceptionFeatures


def _run(capsys, *argv):
    code = main(["eval", *map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def setup(tmp_path):
    w = tiny_trunk_file(tmp_path)
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    write_images(gen, 30, seed=0)
    write_images(ref, 30, seed=1, offset=50)
    return w, gen, ref


def _direct_fid(w, gen, ref, mode="tf"):
    ext = InceptionFeatures(w, mode)
    stats = []
    for folder in (gen, ref):
        src = FileImageSource(folder)
        feats = torch.cat([ext(src.load(i)[None]) for i in range(len(src))])
        stats.append(FeatureStats.from_features(feats, ext.meta()))
    return stats[0].frechet_distance(stats[1])


def test_fid_json_matches_direct_computation_and_stats_reuse(setup, capsys, tmp_path):
    w, gen, ref = setup
    code, out, _ = _run(capsys, "fid", gen, ref, "--inception-weights", w, "--json", "--batch-size", 7)
    assert code == 0
    res = json.loads(out)
    assert res["metric"] == "fid" and res["gen"]["n"] == 30 and res["preprocess"] == "tf"
    assert res["value"] == pytest.approx(_direct_fid(w, gen, ref), rel=1e-6)

    # statistics computed once and reused give the same number; summary line otherwise
    code, _, _ = _run(capsys, "stats", ref, tmp_path / "ref.npz", "--inception-weights", w)
    assert code == 0
    code, out, _ = _run(capsys, "fid", gen, tmp_path / "ref.npz", "--inception-weights", w)
    assert code == 0 and out.startswith("FID: ")
    assert float(out.split()[1]) == pytest.approx(res["value"], rel=1e-4)
    # ... but not with another preprocessing
    code, _, err = _run(capsys, "fid", gen, tmp_path / "ref.npz", "--inception-weights", w, "--preprocess", "clean")
    assert code == 2 and "preprocess" in err

    # a zip holds the same images
    with zipfile.ZipFile(tmp_path / "gen.zip", "w") as zf:
        for p in sorted(gen.iterdir()):
            zf.write(p, p.name)
    code, out, _ = _run(
        capsys, "fid", tmp_path / "gen.zip", ref, "--inception-weights", w, "--json", "--num-workers", 1
    )
    assert json.loads(out)["value"] == pytest.approx(res["value"], rel=1e-6)


def test_bad_files_are_listed_and_skipped_only_on_request(setup, capsys):
    w, gen, ref = setup
    (gen / "notes.txt").write_text("not an image")
    (gen / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = _run(capsys, "fid", gen, ref, "--inception-weights", w)
    assert code == 2 and "notes.txt" in err and "broken.png" in err and "--skip-bad" in err
    with pytest.warns(UserWarning, match="skipped 2"):
        code, out, _ = _run(capsys, "fid", gen, ref, "--inception-weights", w, "--skip-bad", "--json")
    res = json.loads(out)
    assert code == 0 and res["gen"]["n"] == 30 and sorted(res["gen"]["skipped"]) == ["broken.png", "notes.txt"]


def test_mixed_sizes_grayscale_rgba_and_too_few_images(setup, capsys, tmp_path):
    w, gen, ref = setup
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (20, 33), dtype=np.uint8)).save(gen / "gray.png")
    Image.fromarray(rng.integers(0, 255, (17, 45, 4), dtype=np.uint8)).save(gen / "rgba.png")
    code, out, _ = _run(capsys, "fid", gen, ref, "--inception-weights", w, "--json")
    assert code == 0 and json.loads(out)["gen"]["n"] == 32
    one = tmp_path / "one"
    write_images(one, 1, seed=5)
    code, _, err = _run(capsys, "fid", one, ref, "--inception-weights", w)
    assert code == 2 and "at least 2" in err


def test_kid_cli_matches_function(setup, capsys, tmp_path):
    from fewstep.eval.metrics import kernel_inception_distance

    w, gen, ref = setup
    code, out, err = _run(capsys, "kid", gen, ref, "--inception-weights", w, "--json", "--subsets", 5)
    res = json.loads(out)
    assert code == 0 and res["subset_size"] == 30 and "capped" in err
    ext = InceptionFeatures(w)
    f = [torch.cat([ext(s.load(i)[None]) for i in range(len(s))]) for s in (FileImageSource(gen), FileImageSource(ref))]
    m, _ = kernel_inception_distance(f[1], f[0], subsets=5, subset_size=30)
    assert res["value"] == pytest.approx(m, rel=1e-6)
    code, _, _ = _run(capsys, "stats", ref, tmp_path / "r.npz", "--inception-weights", w, "--keep-features")
    code, out, _ = _run(capsys, "kid", gen, tmp_path / "r.npz", "--inception-weights", w, "--json", "--subsets", 5)
    assert json.loads(out)["value"] == pytest.approx(m, rel=1e-5)


def test_bad_arguments(setup, capsys, tmp_path):
    w, gen, ref = setup
    code, _, err = _run(capsys, "fid", gen, tmp_path / "missing", "--inception-weights", w)
    assert code == 2 and "missing" in err
    code, _, err = _run(capsys, "fid", gen, ref, "--inception-weights", w, "--batch-size", 0)
    assert code == 2 and "--batch-size" in err
