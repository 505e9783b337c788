"""The command line under bad conditions (issue 11): unwritable outputs fail before any work,
corrupt files and broken inputs get errors naming the file and what to do, Ctrl-C prints one line
with how to resume (exit 130), ``fewstep ems`` checkpoints next to its output by default, and
every output is written atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_cli_options import _probe
from test_ems import CFG, _mix_setup

from fewstep.apps.cli import INTERRUPTED, main
from fewstep.samplers import EMS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ------------------------------------------------------------------------------------------------
# 1. unwritable output paths: a clear error naming the path, before torch is imported
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # CLI subprocesses
@pytest.mark.parametrize("argv", [
    ["ems", "--output", "F/ems.safetensors"],
    ["train-teacher", "--output-dir", "F/teacher"],
    ["train-classifier", "--output-dir", "F/classifier"],
    ["fit-linear-ag", "--output", "F/linear_ag.json"],
    ["sample", "--out", "F/samples"],
    ["distill", "cd", "--output", "F/run"],
])
def test_unwritable_output_fails_before_torch(argv, tmp_path):
    """``F`` is a regular file, so nothing can be created under it: the error names the path and
    comes before torch loads (so long before any work)."""
    blocker = tmp_path / "F"
    blocker.write_text("a file, not a folder")
    argv = [a.replace("F/", f"{blocker}/") for a in argv]
    rc, heavy, err = _probe(*argv)
    assert rc == 2 and str(blocker) in err and "cannot create the folder" in err, err
    assert heavy == "-", f"{argv} imported {heavy} before reporting the error"


def test_writability_checked_before_work(tmp_path, monkeypatch, capsys):
    """In process: the output check raises before the expensive call would run."""
    import fewstep.samplers
    from fewstep.models import train

    def never(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(fewstep.samplers, "compute_ems", never)
    monkeypatch.setattr(train, "load_digits_split", never)
    blocker = tmp_path / "F"
    blocker.write_text("")
    assert main(["ems", "--output", str(blocker / "e.safetensors")]) == 2
    assert main(["ems", "--output", str(tmp_path / "e.npz")]) == 2
    err = capsys.readouterr().err
    assert f"--output: cannot create the folder {str(blocker)!r}" in err and "must end with .safetensors" in err
    with pytest.raises(ValueError, match="output_dir: cannot create the folder"):
        train.train_teacher({"steps": 1}, output_dir=blocker / "t", work_dir=tmp_path / "w", progress=False)
    with pytest.raises(ValueError, match="output_dir: cannot create the folder"):
        train.train_classifier({"epochs": 1}, output_dir=blocker / "c", work_dir=tmp_path / "w2", progress=False)


# ------------------------------------------------------------------------------------------------
# 2. corrupt files name the file and say what to do
# ------------------------------------------------------------------------------------------------


def test_corrupt_ems_file_names_it(tmp_path):
    _, model, x0 = _mix_setup()
    from fewstep.samplers import compute_ems

    ems = compute_ems(model, CFG, x0, num_grid=4, batch_size=48, dtype=torch.float64, progress=False)
    good = ems.save(tmp_path / "e.safetensors")
    data = good.read_bytes()
    for name, blob in (("truncated", data[: len(data) // 2]), ("garbage", b"\x00" * 64), ("empty", b"")):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match="unreadable") as info:
            EMS.load(bad)
        assert str(bad) in str(info.value) and "fewstep ems" in str(info.value)


def test_corrupt_ems_checkpoint_names_it(tmp_path):
    from fewstep.samplers import compute_ems

    _, model, x0 = _mix_setup()
    ckpt = tmp_path / "ems.checkpoint.pt"
    ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="unreadable") as info:
        compute_ems(model, CFG, x0, num_grid=4, batch_size=48, dtype=torch.float64, progress=False, checkpoint=ckpt)
    assert f"rm {ckpt}" in str(info.value)


def test_corrupt_teacher_checkpoint_names_it(tmp_path):
    from fewstep.models import train

    work = tmp_path / "work"
    work.mkdir()
    ckpt = work / "checkpoint.pt"
    ckpt.write_bytes(b"\x80\x04 truncated pickle")
    with pytest.raises(ValueError, match="unreadable") as info:
        train.train_teacher({"steps": 1}, work_dir=work, output_dir=tmp_path / "out", progress=False)
    assert f"rm {ckpt}" in str(info.value)
    torch.save([1, 2, 3], ckpt)  # readable, but not a fewstep checkpoint
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train.train_classifier({"epochs": 1}, work_dir=work, output_dir=tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------------
# 5. bad inputs
# ------------------------------------------------------------------------------------------------


def mixture():
    """``module:callable`` for ``fewstep ems --model test_cli_hardening:mixture``."""
    _, model, x0 = _mix_setup()
    return model, CFG, x0


_INTERRUPT_AFTER = {"calls": None}


def interrupted_mixture():
    """Like :func:`mixture`, but the model raises KeyboardInterrupt (Ctrl-C) after
    ``_INTERRUPT_AFTER["calls"]`` evaluations."""
    _, model, x0 = _mix_setup()
    count = {"n": 0}

    def model_fn(x, t, c):
        count["n"] += 1
        if _INTERRUPT_AFTER["calls"] is not None and count["n"] > _INTERRUPT_AFTER["calls"]:
            raise KeyboardInterrupt
        return model(x, t, c)

    return model_fn, CFG, x0


_EMS_ARGS = ["--num-grid", "6", "--batch-size", "16", "--pairs-per-call", "64", "--float64", "--device", "cpu",
             "--threads", "1", "--quiet"]


def test_ems_module_callable_errors(tmp_path, capsys):
    out = str(tmp_path / "e.safetensors")
    assert main(["ems", "--model", "no_such_module_xyz:make", "--output", out]) == 2
    assert main(["ems", "--model", "test_cli_hardening:no_such_function", "--output", out]) == 2
    assert main(["ems", "--model", "test_cli_hardening:", "--output", out]) == 2
    err = capsys.readouterr().err
    assert "no module named 'no_such_module_xyz'" in err
    assert "module 'test_cli_hardening' has no attribute 'no_such_function'" in err
    assert "must look like package.module:function" in err
    assert not list(tmp_path.iterdir())


def test_ems_data_file_forms(tmp_path, capsys):
    """``--data`` with a dict: the samples under 'x'/'samples' are used; other dicts and objects are
    refused naming the keys/type."""
    from fewstep.apps.cmd_ems import _load_data

    x = torch.randn(8, 1, 4, 4)
    y = torch.arange(8)
    for obj, want in ((x, x), ({"x": x}, x), ({"samples": x, "labels": y}, (x, y)), ((x, y), (x, y))):
        torch.save(obj, tmp_path / "d.pt")
        got = _load_data(str(tmp_path / "d.pt"))
        if isinstance(want, tuple):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        else:
            assert torch.equal(got, want)
    torch.save({"images": x, "targets": y}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"dict with keys \['images', 'targets'\].*'x' or 'samples'"):
        _load_data(str(tmp_path / "d.pt"))
    torch.save([1, 2, 3], tmp_path / "d.pt")
    with pytest.raises(ValueError, match="holds a list"):
        _load_data(str(tmp_path / "d.pt"))
    (tmp_path / "d.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable torch file"):
        _load_data(str(tmp_path / "d.pt"))


def test_broken_json_names_file_and_position(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "teacher": {"steps": 3,}\n}\n')
    assert main(["train-teacher", "--config", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "invalid JSON" in err
    # the scheduler config of an EMS model folder
    folder = tmp_path / "model"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text('{"beta_schedule": linear}')
    assert main(["ems", "--model", str(folder), "--output", str(tmp_path / "e.safetensors")]) == 2
    assert "scheduler_config.json:1:19: invalid JSON" in capsys.readouterr().err
    # a LinearAG coefficients file, a sample folder's model_index.json
    from fewstep.guidance.linear_ag import LinearAG

    with pytest.raises(ValueError, match=f"{bad}:2:"):
        LinearAG(bad)
    (folder / "model_index.json").write_text("{")
    from fewstep.apps.loading import load_model

    with pytest.raises(ValueError, match="model_index.json:1:2: invalid JSON"):
        load_model(str(folder), "cpu", cache=False)


def test_set_timesteps_on_missing_cuda_is_a_clear_error():
    from fewstep.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for sched in (DPMSolverPPScheduler(), DPMSolverV3Scheduler()):
        with pytest.raises(ValueError, match="device='cuda' is not available here"):
            sched.set_timesteps(4, device="cuda")


# ------------------------------------------------------------------------------------------------
# 6. Ctrl-C: one line, how to resume, exit 130; fewstep ems checkpoints by default
# ------------------------------------------------------------------------------------------------


def test_ems_ctrl_c_then_rerun_resumes_from_default_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ems.safetensors"
    ckpt = tmp_path / "ems.checkpoint.pt"
    argv = ["ems", "--model", "test_cli_hardening:interrupted_mixture", "--output", str(out), *_EMS_ARGS]
    monkeypatch.setitem(_INTERRUPT_AFTER, "calls", 4)
    assert main(argv) == INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewstep ems: interrupted" in err[0] and f"progress is saved in {ckpt}" in err[0]
    assert "rerun the same command to resume" in err[0]
    assert ckpt.exists() and not out.exists()
    saved = torch.load(ckpt, weights_only=False)
    assert saved["done"] or saved["pass"] > 1  # progress was saved before the interrupt
    # the rerun resumes (the model is not called for the saved batches) and equals an uninterrupted run
    monkeypatch.setitem(_INTERRUPT_AFTER, "calls", None)
    assert main(argv) == 0
    assert out.exists() and not ckpt.exists()  # the spent checkpoint is removed
    capsys.readouterr()
    ref = tmp_path / "ref.safetensors"
    assert main(["ems", "--model", "test_cli_hardening:mixture", "--output", str(ref), *_EMS_ARGS]) == 0
    got, want = EMS.load(out), EMS.load(ref)
    for k in ("l", "s", "b"):
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k))


@pytest.mark.parametrize("argv, hint", [
    (["sample", "--out", "OUT", "--n", "1", "--steps", "2", "--no-progress"], "rerun the same command to start again"),
    (["train-teacher", "--steps", "1", "--output-dir", "OUT", "--work-dir", "WORK"], "WORK/checkpoint.pt"),
    (["distill", "cd", "--output", "OUT"], "checkpoints are in OUT/checkpoints; rerun the same command with --resume"),
])
def test_ctrl_c_prints_one_line_and_exits_130(argv, hint, tmp_path, capsys, monkeypatch):
    import fewstep.apps.generate
    from fewstep.distill import trainer
    from fewstep.models import train

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fewstep.apps.generate, "generate", interrupt)
    monkeypatch.setattr(train, "train_teacher", interrupt)
    monkeypatch.setattr(trainer, "Trainer", interrupt)
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("WORK", str(tmp_path / "w")) for a in argv]
    hint = hint.replace("WORK", str(tmp_path / "w")).replace("OUT", str(tmp_path / "o"))
    assert main(argv) == INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"fewstep {argv[0]}: interrupted;" in err[0] and hint in err[0], err


@pytest.mark.slow  # a CLI subprocess and a real SIGINT
def test_real_sigint_gives_one_line_no_traceback(tmp_path):
    out = tmp_path / "e.safetensors"
    cmd = [sys.executable, "-m", "fewstep.apps.cli", "ems", "--model", "test_cli_hardening:mixture", "--num-grid",
           "400", "--batch-size", "4", "--pairs-per-call", "8", "--float64", "--device", "cpu", "--threads", "1",
           "--quiet", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore"}
    # SIG_DFL in the child: a test run started in the background (`cmd &`) inherits an ignored SIGINT, and
    # Python then installs no KeyboardInterrupt handler, so the job would just finish (exit 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = tmp_path / "e.checkpoint.pt"
    # signal only once the first batch is checkpointed: the job is then inside its loop, whatever the load
    deadline = time.time() + 180
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if not ckpt.exists():
        proc.kill()
        pytest.fail(f"no checkpoint after {time.time() - deadline + 180:.0f} s (exit {proc.poll()}): "
                    f"{proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == INTERRUPTED, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fewstep ems: interrupted; progress is saved in"), err
    assert ckpt.exists() and not out.exists()


# ------------------------------------------------------------------------------------------------
# 7. atomic writes; train-teacher's default output is a user folder
# ------------------------------------------------------------------------------------------------


def _fail_after_write(monkeypatch, module, name):
    """Make ``module.name`` (a writer) write its file and then fail, as a kill right after would."""
    real = getattr(module, name)

    def writer(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, writer)


def test_ems_save_is_one_unit(tmp_path, monkeypatch):
    """A failure while the sidecar JSON is written leaves neither the new tensors nor a partial JSON."""
    _, model, x0 = _mix_setup()
    from fewstep.samplers import compute_ems

    ems = compute_ems(model, CFG, x0, num_grid=4, batch_size=48, dtype=torch.float64, progress=False)
    path = ems.save(tmp_path / "e.safetensors")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ems.metadata["note"] = "second"

    import pathlib

    real = pathlib.Path.write_text

    def broken(self, *a, **k):
        real(self, "{ partial", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", broken)
    with pytest.raises(KeyboardInterrupt):
        ems.save(path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads((tmp_path / "e.json").read_text())["num_grid"] == 4


def test_teacher_outputs_are_one_unit_in_a_user_folder(tmp_path, monkeypatch, capsys):
    """train-teacher defaults to out/teacher (relative to the working folder, not the package), and a
    failure while writing the record leaves no weights without config (nothing at all)."""
    from fewstep.apps import cmd_teacher
    from fewstep.apps.cli import build_parser
    from fewstep.models import train

    args = build_parser().parse_args(["train-teacher"])
    assert args.output_dir == "out/teacher" == train.TEACHER_OUTPUT_DIR
    assert build_parser().parse_args(["train-classifier"]).output_dir == train.CLASSIFIER_OUTPUT_DIR
    assert cmd_teacher.OUTPUT_DIRS == {"teacher": train.TEACHER_OUTPUT_DIR, "classifier": train.CLASSIFIER_OUTPUT_DIR}
    cfg = {"steps": 2, "batch_size": 8, "checkpoint_every": 1,
           "unet": {"block_out_channels": [16, 16, 16], "norm_num_groups": 8}}
    monkeypatch.chdir(tmp_path)
    real = train._write_json

    def fail_on_record(path, obj):
        real(path, obj)
        if "digits_teacher_train" in path.name:  # the last file of the set, its temporary name
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_write_json", fail_on_record)
    with pytest.raises(KeyboardInterrupt):
        train.train_teacher(cfg, work_dir="w", progress=False)
    out = tmp_path / "out" / "teacher"
    assert out.is_dir() and list(out.iterdir()) == []  # nothing renamed into place, no temporary left
    monkeypatch.setattr(train, "_write_json", real)
    record = train.train_teacher(cfg, work_dir="w", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["digits_scheduler_config.json", "digits_teacher_train.json",
                                                     "digits_unet.safetensors", "digits_unet_config.json"]
    assert json.loads((out / "digits_teacher_train.json").read_text())["seed"] == record["seed"]


def test_sample_record_and_images_written_atomically(tmp_path, monkeypatch):
    """fewstep sample writes record.json (and the PNGs) through fewstep._io: a failure mid-write
    leaves no record.json."""
    from fewstep import _io

    real = _io.atomic_write_text

    def broken(path, text, encoding="utf-8"):
        raise KeyboardInterrupt

    out = tmp_path / "s"
    monkeypatch.setattr(_io, "atomic_write_text", broken)
    assert main(["sample", "--out", str(out), "--n", "2", "--steps", "2", "--no-progress"]) == INTERRUPTED
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "grid.png"]
    monkeypatch.setattr(_io, "atomic_write_text", real)
    assert main(["sample", "--out", str(out), "--n", "2", "--steps", "2", "--no-progress"]) == 0
    assert json.loads((out / "record.json").read_text())["images"] == ["000000.png", "000001.png"]
