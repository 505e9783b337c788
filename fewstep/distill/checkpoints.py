"""A distillation run directory and its checkpoints: listing, atomic writing, loading one at a time.

Layout of a run directory (``fewstep distill ... --output RUN``)::

    RUN/config.json          the resolved recipe (+ versions)
    RUN/log.jsonl            one JSON line per training step (losses, lr) and per evaluation
    RUN/train.log            the text log
    RUN/checkpoints/step-000500/
        <model>.safetensors       weights of every trained model (``student``, ...; LoRA runs: adapters only)
        <model>_ema.safetensors   the EMA weights of the EMA'd model (full state dict, loadable alone)
        <state>.safetensors       extra checkpointed modules of the method (``target`` of CD/LCM)
        training_state.pt         optimizers, LR schedulers, EMA counters, data position, counters
        rng-rank<r>.pt            RNG states of process r (python, numpy, torch, cuda, the data generator)
        meta.json                 written last: step, time, metrics, file list (a checkpoint without it
                                  is incomplete and ignored)
    RUN/final/               the exported student (see the method)
    RUN/plots/curves.png     loss and FD-vs-step
    RUN/summary.json         wall time, peak memory, last evaluation
    RUN/tb/                  TensorBoard events

Checkpoints are written into ``checkpoints/.tmp-step-NNNNNN`` and renamed when complete, so a
crash never leaves a half-written checkpoint under a real name. Old checkpoints lose their
``training_state.pt`` and RNG files (``checkpoint.keep_last``) but keep their weights, so
:func:`list_checkpoints` enumerates every saved step for LCSC and :func:`load_weights` reads one
model of one checkpoint without touching the others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint at ``step``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{int(step):06d}"


@dataclass
class CheckpointInfo:
    """One complete checkpoint: ``step``, ``path``, the ``models`` it holds weights for (file stems,
    e.g. ``["student", "student_ema", "target"]``), whether it can resume training
    (``resumable``) and its ``meta`` (metrics at that step, wall time...)."""

    step: int
    path: Path
    models: list[str] = field(default_factory=list)
    resumable: bool = False
    meta: dict = field(default_factory=dict)


def list_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Every complete checkpoint of a run, by increasing step (empty when there is none)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if not (m and d.is_dir() and (d / "meta.json").is_file()):
            continue
        meta = json.loads((d / "meta.json").read_text())
        models = sorted(f.stem for f in d.glob("*.safetensors"))
        out.append(CheckpointInfo(int(m.group(1)), d, models, (d / "training_state.pt").is_file(), meta))
    return sorted(out, key=lambda c: c.step)


def latest_resumable(run_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The newest checkpoint that holds a training state, or None."""
    ok = [c for c in list_checkpoints(run_dir) if c.resumable]
    return ok[-1] if ok else None


def load_weights(checkpoint: CheckpointInfo | str | os.PathLike, model: str = "student_ema",
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (e.g. ``"student"``, ``"student_ema"``) stored in one checkpoint
    (a :class:`CheckpointInfo` or its folder). Only that file is read."""
    from safetensors.torch import load_file

    path = checkpoint.path if isinstance(checkpoint, CheckpointInfo) else Path(checkpoint)
    f = path / f"{model}.safetensors"
    if not f.is_file():
        have = sorted(p.stem for p in path.glob("*.safetensors"))
        raise FileNotFoundError(f"checkpoint {path} holds no weights {model!r}; it has: {', '.join(have) or 'none'}")
    return load_file(str(f), device=str(device))


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict as safetensors (contiguous CPU tensors)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def tmp_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The temporary folder a checkpoint is written into before :func:`commit`."""
    return Path(run_dir) / CHECKPOINT_DIR / f".tmp-step-{int(step):06d}"


def commit(run_dir: str | os.PathLike, step: int, meta: dict) -> Path:
    """Finish the checkpoint written into :func:`tmp_dir`: write ``meta.json`` and rename the folder
    (replacing an older checkpoint of the same step)."""
    tmp, final = tmp_dir(run_dir, step), step_dir(run_dir, step)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Drop training states (optimizer, RNG) of all but the newest ``keep_last`` resumable checkpoints;
    their weights stay. Also removes leftover temporary folders of crashed writes."""
    root = Path(run_dir) / CHECKPOINT_DIR
    for d in root.glob(".tmp-step-*"):
        shutil.rmtree(d, ignore_errors=True)
    resumable = [c for c in list_checkpoints(run_dir) if c.resumable]
    for c in resumable[:-keep_last] if keep_last > 0 else resumable:
        for f in [c.path / "training_state.pt", *c.path.glob("rng-rank*.pt")]:
            f.unlink(missing_ok=True)
