"""fewstep._io: atomic writes (temp file in the same folder + os.replace) and the up-front
writability check. A writer that dies midway must leave the previous file intact and no
truncated file at the target."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fewstep._io import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_writes_create_and_replace(tmp_path):
    p = tmp_path / "a.bin"
    assert atomic_write_bytes(p, b"one") == p
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "h\u00e9llo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "h\u00e9llo\n"
    atomic_write_json(tmp_path / "r.json", {"a": [1, 2], "b": "x"})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2], "b": "x"}
    assert _leftovers(tmp_path) == ["a.bin", "r.json", "t.txt"]  # no temp files left behind


def test_atomic_path_gives_writers_a_name_with_the_target_suffix(tmp_path):
    # np.savez appends ".npz" to names without it; the temp name must keep the suffix
    out = tmp_path / "stats.npz"
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npz" and tmp.name.startswith(".")
        np.savez(tmp, mu=np.arange(3.0))
    with np.load(out) as z:
        np.testing.assert_array_equal(z["mu"], np.arange(3.0))
    assert _leftovers(tmp_path) == ["stats.npz"]


def test_new_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
        with atomic_path(tmp_path / "b.npz") as tmp:
            np.savez(tmp, x=np.zeros(1))
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.npz").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_writer_dying_midway_keeps_the_old_file(tmp_path, exc):
    out = tmp_path / "stats.npz"
    np.savez(out, mu=np.ones(4))
    before = out.read_bytes()

    def dying_writer(path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise exc("killed during the write")

    with pytest.raises(exc):
        with atomic_path(out) as tmp:
            dying_writer(tmp)
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == ["stats.npz"]
    # a new file that was never completed does not appear at all
    with pytest.raises(exc):
        with atomic_path(tmp_path / "new.npz") as tmp:
            dying_writer(tmp)
    assert _leftovers(tmp_path) == ["stats.npz"]


def test_json_that_cannot_be_encoded_leaves_nothing(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"ok": 1}')
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert p.read_text() == '{"ok": 1}' and _leftovers(tmp_path) == ["r.json"]


def test_check_writable_names_the_problem(tmp_path):
    assert check_writable(tmp_path / "out.npz") == tmp_path / "out.npz"
    assert _leftovers(tmp_path) == []  # the probe is removed
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        check_writable(tmp_path / "missing" / "out.npz", what="OUT")
    with pytest.raises(ValueError, match="OUT.*is a folder"):
        check_writable(tmp_path, what="OUT")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        check_writable(tmp_path / "file" / "out.npz")


def test_check_writable_unwritable_folder(tmp_path, monkeypatch):
    """A folder that refuses new files (read-only, no permission; simulated: the tests may run as root)."""
    import fewstep._io as io_mod

    def refuse(path, flags, mode=0o777):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io_mod.os, "open", refuse)
    with pytest.raises(ValueError, match="--out: cannot write to .*Permission denied"):
        check_writable(tmp_path / "out.npz", what="--out")


def test_a_writer_that_appends_a_suffix_is_caught(tmp_path):
    """np.savez appends ".npz" to a name without it: the temp file would stay empty and replace the
    target with an empty file. atomic_path notices, keeps the target and cleans up."""
    out = tmp_path / "stats"  # no .npz
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="appended a suffix.*atomic_open"):
        with atomic_path(out) as tmp:
            np.savez(str(tmp), mu=np.zeros(2))
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == ["stats"]
    with atomic_open(out, "wb") as f:  # the file-object form writes exactly there
        np.savez(f, mu=np.zeros(2))
    with np.load(out) as z:
        assert z["mu"].shape == (2,)


def test_atomic_paths_all_or_nothing(tmp_path):
    """Several files as one unit: a failure while writing the last leaves every target as it was
    and no temporary file; success renames all."""
    from fewstep._io import atomic_paths

    a, b = tmp_path / "w.bin", tmp_path / "w.json"
    a.write_bytes(b"old weights")
    with pytest.raises(KeyboardInterrupt):
        with atomic_paths(a, b) as (ta, tb):
            ta.write_bytes(b"new weights")
            tb.write_text("{ partial")
            raise KeyboardInterrupt
    assert _leftovers(tmp_path) == ["w.bin"] and a.read_bytes() == b"old weights"
    with atomic_paths(a, b) as (ta, tb):
        ta.write_bytes(b"new weights")
        tb.write_text("{}")
    assert _leftovers(tmp_path) == ["w.bin", "w.json"] and a.read_bytes() == b"new weights"


def test_read_json_and_check_output_dir(tmp_path):
    from fewstep._io import check_output_dir, read_json

    f = tmp_path / "c.json"
    f.write_text('{\n  "a": 1,\n  "b": }\n')
    with pytest.raises(ValueError, match=rf"--config: {f}:3:8: invalid JSON: Expecting value"):
        read_json(f, "--config")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    f.write_text('{"a": [1, 2]}')
    assert read_json(f) == {"a": [1, 2]}
    assert check_output_dir(tmp_path / "x" / "y", "--out").is_dir()
    with pytest.raises(ValueError, match="--out: cannot create the folder .*: a file of that name exists"):
        check_output_dir(f, "--out")
    with pytest.raises(ValueError, match="--out: cannot create the folder"):
        check_output_dir(f / "sub", "--out")


def test_read_checkpoint_names_the_file(tmp_path):
    import pickle

    from fewstep._io import read_checkpoint

    f = tmp_path / "ck.pkl"
    f.write_bytes(b"\x80\x04 truncated")
    with pytest.raises(ValueError, match=rf"checkpoint '{f}' is unreadable .*rm {f}"):
        read_checkpoint(f, lambda p: pickle.loads(p.read_bytes()))
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "none", lambda p: open(p, "rb"))


def test_load_callable_says_which_part_is_missing(tmp_path, monkeypatch):
    from fewstep._imports import load_callable

    assert load_callable("json:dumps") is json.dumps
    assert load_callable("os.path:join") is os.path.join
    with pytest.raises(ValueError, match="no module named 'no_such_mod_q'"):
        load_callable("no_such_mod_q:f")
    with pytest.raises(ValueError, match="module 'json' has no attribute 'dumpz'"):
        load_callable("json:dumpz")
    with pytest.raises(ValueError, match="'__doc__' is not callable"):
        load_callable("json:__doc__")
    with pytest.raises(ValueError, match="must look like package.module:function"):
        load_callable("json")
    # a module that exists but imports something missing: that import error is shown, not "no module"
    (tmp_path / "broken_mod_q.py").write_text("import missing_dependency_q\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="missing_dependency_q"):
        load_callable("broken_mod_q:f")


def test_check_output_dir_without_creating(tmp_path):
    from fewstep._io import check_output_dir

    target = tmp_path / "a" / "b"
    assert check_output_dir(target, "--out", create=False) == target and not (tmp_path / "a").exists()
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"--out: cannot create the folder .*'.*/f' is a file"):
        check_output_dir(blocker / "x" / "y", "--out", create=False)
    assert _leftovers(tmp_path) == ["f"]
