"""``fewstep eval`` checks every input and its output location before the first feature pass, writes
its statistics atomically and exactly where it is told (issue 11). A TorchScript stand-in keeps the
Inception cheap; every embedding is counted to prove that nothing was computed before an error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_eval_common import tiny_trunk_file, write_images

from fewstep.apps.cli import main
from fewstep.eval.frechet import FeatureStats
from fewstep.eval.inception import InceptionFeatures


def _run(capsys, *argv):
    code = main(["eval", *map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """(weights, gen folder, ref folder, list that grows by the batch size of every embedding)."""
    w = tiny_trunk_file(tmp_path)
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    write_images(gen, 12, seed=0)
    write_images(ref, 12, seed=1, offset=50)
    calls: list[int] = []
    real = InceptionFeatures.embed

    def counting(self, x):
        calls.append(len(x))
        return real(self, x)

    monkeypatch.setattr(InceptionFeatures, "embed", counting)
    return w, gen, ref, calls


def test_stats_writes_exactly_the_path_given_and_it_works_as_a_reference(setup, capsys, tmp_path):
    """`eval stats X OUT` wrote OUT.npz and printed "wrote OUT". It now writes OUT itself, prints
    that path, and `eval fid GEN OUT` reads it as statistics (recognised by content)."""
    w, gen, ref, _ = setup
    out = tmp_path / "refstats"
    code, text, _ = _run(capsys, "stats", ref, out, "--inception-weights", w)
    assert code == 0 and out.is_file() and not (tmp_path / "refstats.npz").exists()
    assert f"wrote {out} " in text
    code, text, _ = _run(capsys, "fid", gen, out, "--inception-weights", w, "--json")
    via_stats = json.loads(text)["value"]
    code, text, _ = _run(capsys, "fid", gen, ref, "--inception-weights", w, "--json")
    assert via_stats == pytest.approx(json.loads(text)["value"], rel=1e-9)
    code, text, _ = _run(capsys, "stats", ref, tmp_path / "ref.npz", "--inception-weights", w, "--json")
    assert json.loads(text)["out"] == str(tmp_path / "ref.npz")


@pytest.mark.parametrize("keep_features", [False, True])
def test_a_kill_while_writing_the_statistics_loses_nothing(setup, capsys, tmp_path, monkeypatch, keep_features):
    """The statistics were written in place after the .partial checkpoint was deleted: a kill
    during the write left a truncated .npz and no checkpoint. Now the old file survives, the
    checkpoint stays until the new file is complete, and the rerun embeds nothing again."""
    w, gen, ref, calls = setup
    out = tmp_path / "ref.npz"
    extra = ["--keep-features"] if keep_features else []
    assert _run(capsys, "stats", gen, out, "--inception-weights", w, *extra)[0] == 0  # an older file
    old = out.read_bytes()
    real_savez = np.savez

    def killed_savez(file, **arrays):
        file.write(b"PK\x03\x04" + b"\0" * 100)  # the first bytes of a zip ...
        raise KeyboardInterrupt  # ... and the process dies

    monkeypatch.setattr(np, "savez", killed_savez)
    calls.clear()
    # Ctrl-C: one line saying where the progress is, exit status 130 (128 + SIGINT)
    assert main(["eval", "stats", str(ref), str(out), "--inception-weights", str(w), "--no-progress", *extra]) == 130
    assert f"interrupted; progress is saved in {out}.partial" in capsys.readouterr().err
    assert sum(calls) == 12
    assert out.read_bytes() == old  # never truncated
    assert (tmp_path / "ref.npz.partial").is_file()  # the finished pass is kept
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files

    monkeypatch.setattr(np, "savez", real_savez)
    calls.clear()
    code, _, _ = _run(capsys, "stats", ref, out, "--inception-weights", w, *extra)
    assert code == 0 and calls == []  # resumed at 100 %
    assert not (tmp_path / "ref.npz.partial").exists()
    st = FeatureStats.load(out)
    assert st.n == 12 and "ref" in st.meta["source"]
    with np.load(out) as z:
        assert ("feats" in z.files) == keep_features


def test_fid_checks_every_input_before_any_feature_pass(setup, capsys, tmp_path):
    """`eval fid GEN <empty>` failed only after GEN's whole pass; every input is now checked first."""
    w, gen, ref, calls = setup
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "fid", gen, tmp_path / "empty", "--inception-weights", w)
    assert code == 2 and "no images in folder" in err and "empty" in err

    (ref / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = _run(capsys, "fid", gen, ref, "--inception-weights", w)
    assert code == 2 and "broken.png" in err
    (ref / "broken.png").unlink()

    one = tmp_path / "one"
    write_images(one, 1, seed=3)
    code, _, err = _run(capsys, "fid", gen, one, "--inception-weights", w)
    assert code == 2 and "at least 2" in err and "one" in err

    other = FeatureStats.from_features(torch.randn(30, 24, dtype=torch.float64), {"extractor": "other-net"})
    other.save(tmp_path / "other.npz")
    code, _, err = _run(capsys, "fid", gen, tmp_path / "other.npz", "--inception-weights", w)
    assert code == 2 and "other.npz" in err and "'other-net'" in err

    mism = tmp_path / "mismatch.npz"
    np.savez(mism, mu=np.zeros(2048), sigma=np.eye(10))
    code, _, err = _run(capsys, "fid", gen, mism, "--inception-weights", w)
    assert code == 2 and "mismatch.npz" in err and "(10, 10)" in err

    FeatureStats.from_features(torch.randn(30, 24, dtype=torch.float64)).save(tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "fid", gen, tmp_path / "cut.npz", "--inception-weights", w)
    assert code == 2 and "cut.npz" in err and "truncated" in err

    code, _, err = _run(capsys, "kid", gen, tmp_path / "good.npz", "--inception-weights", w)
    assert code == 2 and "holds no features" in err

    (tmp_path / "bad.pt").write_bytes(w.read_bytes()[:500])
    code, _, err = _run(capsys, "fid", gen, ref, "--inception-weights", tmp_path / "bad.pt")
    assert code == 2 and "bad.pt" in err and "cannot be loaded" in err
    assert calls == []  # not one image was embedded


def test_stats_checks_its_output_before_the_feature_pass(setup, capsys, tmp_path):
    w, gen, ref, calls = setup
    code, _, err = _run(capsys, "stats", ref, tmp_path / "missing" / "ref.npz", "--inception-weights", w)
    assert code == 2 and "missing" in err and "does not exist" in err
    code, _, err = _run(capsys, "stats", ref, tmp_path, "--inception-weights", w)
    assert code == 2 and "is a folder" in err
    assert calls == []


def test_fd_digits_label_files_are_checked_before_the_pass(tmp_path, capsys, monkeypatch):
    from fewstep.eval.fd_digits import DigitsFeatures

    calls = []
    monkeypatch.setattr(DigitsFeatures, "embed_indexed", lambda self, x, i: calls.append(1) / 0)
    write_images(tmp_path / "gen", 3, seed=0)
    labels = tmp_path / "labels.txt"
    for text, expected in (("1\n11\n2\n", "line 2: label 11 is outside 0..9"),
                           ("1\nseven\n2\n", "line 2: 'seven' is not an integer"),
                           ("1\n2\n", "has 2 labels for 3 images")):
        labels.write_text(text)
        code = main(["eval", "fd-digits", str(tmp_path / "gen"), "--labels", str(labels), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and str(labels) in err and expected in err
    assert calls == []
