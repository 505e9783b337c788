"""The ``fewstep`` command line before any work: help text, argument errors before heavy imports, --threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fewstep.apps import options
from fewstep.apps.cli import build_parser, main

_PROBE = """
import sys
from fewstep.apps.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exit:  # --help
    rc = exit.code
heavy = [m for m in ('torch', 'diffusers', 'gradio') if m in sys.modules]
print('RC', rc, 'HEAVY', ','.join(heavy) or '-', file=sys.stderr)
"""


def _probe(*argv) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    last = proc.stderr.strip().splitlines()[-1]
    return int(last.split()[1]), last.split()[3], proc.stderr


@pytest.mark.slow  # ten CLI subprocesses
@pytest.mark.parametrize("argv, message", [
    (["sample"], "--out DIR is required"),
    (["sample", "--out", "X", "--scheduler", "nope"], "scheduler 'nope' is unknown"),
    (["sample", "--out", "X", "--guidance", "apg:foo=1"], "parameter 'foo' is not accepted by apg"),
    (["sample", "--out", "X", "--scheduler-config", "novalue"], "must look like key=value"),
    (["sample", "--out", "X", "--steps", "0"], "steps must be in 1..1000"),
    (["sample", "--out", "X", "--labels", "12"], "labels"),
    (["sample", "--out", "X", "--threads", "0"], "--threads must be an integer >= 1 or 'auto'"),
    (["sample", "--out", "X", "--model", "/no/such/dir"], "no such folder"),
    (["ems", "--output", "x.safetensors", "--num-grid", "0"], "--num-grid must be an integer >= 1"),
    (["demo", "--port", "0"], "--port must be in 1..65535"),
])
def test_argument_errors_come_before_torch_is_imported(argv, message, tmp_path):
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    rc, heavy, err = _probe(*argv)
    assert rc == 2 and message in err, err
    assert heavy == "-", f"{argv} imported {heavy} before reporting the error"
    assert not (tmp_path / "X").exists()


@pytest.mark.slow  # CLI subprocesses
def test_help_and_listings_import_nothing_heavy():
    for argv in (["--help"], ["sample", "--help"], ["eval", "fid", "--help"], ["sample", "--list-guidance"],
                 ["sample", "--list-schedulers"]):
        rc, heavy, err = _probe(*argv)
        assert rc == 0 and heavy == "-", (argv, err[-300:])


def _help(*argv) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])


def test_help_texts_read_well(capsys):
    texts = {}
    for argv in ([], ["sample"], ["demo"], ["eval"], ["eval", "fid"], ["eval", "kid"], ["eval", "clip"],
                 ["eval", "fd-digits"], ["eval", "stats"], ["ems"], ["train-teacher"], ["train-classifier"],
                 ["fit-linear-ag"]):
        _help(*argv)
        texts[" ".join(argv)] = capsys.readouterr().out
    for name, text in texts.items():
        assert "``" not in text and ":func:" not in text and ":class:" not in text, name  # no raw reST
        assert "(default: None)" not in text and ") (default:" not in text, name  # no doubled/empty defaults
        assert "--work-\n" not in text, name
    sample = texts["sample"]
    assert sample.startswith("usage: fewstep sample --out DIR [options]")
    assert "required:\n  --out DIR" in sample and "--threads N" in sample
    for cmd in ("sample", "eval fid", "ems", "demo"):
        assert "--threads N" in texts[cmd], cmd


def test_list_guidance_shows_the_cli_default(capsys):
    assert main(["sample", "--list-guidance"]) == 0
    out = capsys.readouterr().out
    cfg_block = out.split("\napg")[0]
    assert "scale=2.0" in cfg_block and "7.5" not in cfg_block and "classifier-free guidance" in cfg_block


def test_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert options.resolve_threads("auto", tiny=True) == 1
    assert options.resolve_threads("auto", tiny=False) is None
    assert options.resolve_threads("3", tiny=True) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert options.resolve_threads("auto", tiny=True) is None  # the user's environment wins over auto
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="--threads"):
            options.check_threads(bad)
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    monkeypatch.setenv("MKL_NUM_THREADS", str(before))
    try:
        assert options.apply_threads("1", tiny=False) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_sample_applies_threads(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    monkeypatch.setenv("MKL_NUM_THREADS", str(before))
    seen = []


    def load_model(*args, **kwargs):  # the threads are set by the time the model loads
        seen.append(torch.get_num_threads())
        raise ValueError("stop here")

    monkeypatch.setattr("fewstep.apps.loading.load_model", load_model)
    try:
        rc = main(["sample", "--out", str(tmp_path / "o"), "--threads", "1", "--steps", "1", "--n", "1",
                   "--device", "cpu"])
    finally:
        torch.set_num_threads(before)
    assert rc == 2 and seen == [1]


def test_docs_cli_md_names_every_option():
    """docs/cli.md is the option reference: every option of every command appears in it."""
    import argparse
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, prefix + [name])
            elif action.option_strings and "--help" not in action.option_strings:
                if f"`{action.option_strings[-1]}" not in text:
                    missing.append(" ".join(prefix + [action.option_strings[-1]]))

    walk(build_parser(), [])
    assert not missing, f"options missing from docs/cli.md: {missing}"
