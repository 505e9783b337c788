"""LCSC's checkpoints and merged models (Liu et al., ICLR 2025, Eq. 3): the checkpoints to combine
(:func:`checkpoint_refs`: trainer runs, diffusers folders, ``.safetensors`` files), the streaming
merge ``theta(alpha) = sum_i alpha_i theta_i`` into a model's own tensors (:func:`merge`, one
checkpoint in memory at a time), and the template a merge is written into and saved from
(:func:`load_template`, :func:`save_merged`). The coefficient search is :mod:`fewstep.distill.lcsc`,
which re-exports everything here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .._io import atomic_write_json
from .checkpoints import list_checkpoints

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint to combine: a ``.safetensors`` ``path``, a display ``name`` and the training
    ``step`` when known (trainer runs)."""

    name: str
    path: Path
    step: int | None = None


#: the raw trained weights of a run's checkpoints, by kind of run (distillation, teacher training)
RAW_WEIGHTS = ("student", "teacher")


def _refs_of(item: Path, weights: str | None) -> list[CheckpointRef]:
    if item.is_file():
        if item.suffix != ".safetensors":
            raise ValueError(f"checkpoint {item}: a file must be a .safetensors state dict")
        return [CheckpointRef(item.stem, item)]
    if not item.is_dir():
        raise FileNotFoundError(f"checkpoint {item} does not exist")
    if (item / "checkpoints").is_dir():  # a trainer run
        infos = list_checkpoints(item)
        if not infos:
            raise ValueError(f"run {item} has no complete checkpoint (checkpoints/step-*/meta.json)")
        if weights is None:  # the raw weights of whatever the run trained
            have = [w for w in RAW_WEIGHTS if w in infos[0].models]
            if not have:
                raise ValueError(f"run {item}: its checkpoints hold none of {', '.join(RAW_WEIGHTS)} (pass weights=; "
                                 f"they have: {', '.join(infos[0].models) or 'none'})")
            weights = have[0]
        out = []
        for c in infos:
            f = c.path / f"{weights}.safetensors"
            if not f.is_file():
                raise ValueError(f"checkpoint {c.path} holds no weights {weights!r} (weights=); it has: "
                                 f"{', '.join(c.models) or 'none'}")
            out.append(CheckpointRef(f"{item.name}/step-{c.step:06d}", f, c.step))
        return out
    for f in (item / DIFFUSERS_WEIGHTS, item / "unet" / DIFFUSERS_WEIGHTS):
        if f.is_file():
            return [CheckpointRef(item.name, f)]
    raise ValueError(f"checkpoint {item}: not a trainer run (checkpoints/), a diffusers model folder "
                     f"({DIFFUSERS_WEIGHTS} or unet/{DIFFUSERS_WEIGHTS}) or a .safetensors file")


def checkpoint_refs(inputs: str | os.PathLike | Sequence[str | os.PathLike], weights: str | None = None,
                    first_fraction: float | None = None) -> list[CheckpointRef]:
    """The checkpoints named by ``inputs`` (one path or a list), in order: a trainer run folder
    expands to all its checkpoints by step (its ``weights`` file each; default: the raw trained
    weights, the paper's choice -- ``"student"`` of a distillation run, ``"teacher"`` of a
    ``fewstep train-teacher`` work dir --, or e.g. ``"student_ema"``, ``"target"``); a diffusers model
    folder or a ``.safetensors`` file is one checkpoint. ``first_fraction``: keep only checkpoints
    with ``step <= first_fraction * (largest step)`` (LCSC over the first part of a run; needs steps)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ValueError("no checkpoints given")
    refs = [r for it in items for r in _refs_of(Path(it), weights)]
    if first_fraction is not None:
        if not 0 < first_fraction <= 1:
            raise ValueError(f"first_fraction = {first_fraction!r} must be in (0, 1]")
        if any(r.step is None for r in refs):
            raise ValueError("first_fraction needs trainer runs (checkpoints with known steps)")
        last = max(r.step for r in refs)
        refs = [r for r in refs if r.step <= first_fraction * last + 1e-9]
    if len(refs) < 1:
        raise ValueError("no checkpoints left to combine")
    names = [str(r.path) for r in refs]
    if len(set(names)) != len(names):
        raise ValueError("a checkpoint is listed twice")
    return refs


def read_state(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The state dict of one checkpoint (only its file is read)."""
    from safetensors.torch import load_file

    return load_file(str(ref.path))


# ------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------
def check_alpha(alpha, k: int, tol: float = 1e-6) -> np.ndarray:
    """``alpha`` as a float64 array of ``k`` finite coefficients summing to 1 (``ValueError`` otherwise)."""
    a = np.asarray(alpha, dtype=np.float64).reshape(-1)
    if a.shape[0] != k:
        raise ValueError(f"alpha has {a.shape[0]} coefficients, there are {k} checkpoints")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"alpha must be finite, got {a.tolist()}")
    if abs(a.sum() - 1.0) > tol:
        raise ValueError(f"alpha must sum to 1 (LCSC, Eq. 3), got sum {a.sum():.8g}")
    return a


@torch.no_grad()
def merge(refs: Sequence[CheckpointRef], alpha, out: dict[str, torch.Tensor] | None = None,
          reader: Callable[[CheckpointRef], dict] = read_state) -> dict[str, torch.Tensor]:
    """``sum_i alpha_i theta_i`` of the checkpoints ``refs``, streaming (one checkpoint in memory at a time).

    ``out``: the tensors to write into, e.g. ``model.state_dict()`` (which shares the model's storage:
    the model *becomes* the candidate, no copy); ``None`` makes new float32/original-dtype tensors.
    Floating tensors are accumulated in their own dtype when it is float32/float64, else in a float32
    buffer; a one-hot ``alpha`` reproduces that checkpoint bit for bit. Non-floating tensors (integer
    buffers) are taken from the checkpoint with the largest ``|alpha_i|``. Checkpoints with
    ``alpha_i = 0`` are not read. Every checkpoint must hold the same keys and shapes as ``out``.
    """
    a = check_alpha(alpha, len(refs))
    order = [i for i in range(len(refs)) if a[i] != 0.0]
    major = int(np.argmax(np.abs(a)))
    acc: dict[str, torch.Tensor] = {}
    first = True
    for i in order:
        sd = reader(refs[i])
        if out is None:
            out = {k: torch.empty_like(v) for k, v in sd.items()}
        missing, extra = sorted(set(out) - set(sd)), sorted(set(sd) - set(out))
        if missing or extra:
            raise ValueError(f"checkpoint {refs[i].name} does not fit the model: missing keys {missing[:5]}, "
                             f"unexpected keys {extra[:5]}")
        for k, dst in out.items():
            src = sd[k]
            if src.shape != dst.shape:
                raise ValueError(f"checkpoint {refs[i].name}: {k} has shape {tuple(src.shape)}, the model "
                                 f"{tuple(dst.shape)}")
            if not dst.is_floating_point():
                if i == major:
                    dst.copy_(src)
                continue
            buf = dst if dst.dtype in (torch.float32, torch.float64) else acc.setdefault(
                k, torch.empty(dst.shape, dtype=torch.float32, device=dst.device))
            src = src.to(device=buf.device, dtype=buf.dtype)
            if first:
                buf.copy_(src).mul_(float(a[i]))
            else:
                buf.add_(src, alpha=float(a[i]))
        del sd
        first = False
    for k, buf in acc.items():
        out[k].copy_(buf)
    return out


# ------------------------------------------------------------------------------------------------
# the model a search writes into, and the merged model's export
# ------------------------------------------------------------------------------------------------
@dataclass
class Template:
    """The model the candidates are merged into and how it samples: ``pipeline`` (its ``unet`` is the
    model), ``kind`` (``"digits-student"``: a digits student export; ``"digits-teacher"``: a diffusers
    ``UNet2DModel`` folder of a digits teacher), ``name`` and, for students, the exported
    ``scheduler_config`` / ``guidance_range`` / ``record``."""

    pipeline: object
    kind: str
    name: str
    path: Path
    scheduler_config: dict | None = None
    guidance_range: list | None = None
    record: dict | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.pipeline.unet


def _student_name(folder: Path) -> str | None:
    names = sorted(f.name[len("digits_"):-len(".json")] for f in folder.glob("digits_*.json")
                   if (folder / f"digits_{f.name[len('digits_'):-len('.json')]}_unet.safetensors").is_file())
    if len(names) > 1:
        raise ValueError(f"template {folder} holds several digits students ({', '.join(names)}); pass the "
                         "folder of one")
    return names[0] if names else None


def load_template(path: str | os.PathLike, device: str | torch.device = "cpu") -> Template:
    """The model to merge into, from ``path``: a trainer run (its exported ``final/`` student), a folder
    with one exported digits student (``digits_<name>.json`` + ``digits_<name>_unet.safetensors``) or a
    diffusers ``UNet2DModel`` folder of a digits teacher (sampled with DPM-Solver++(2M))."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    from fewstep.models.pipeline import DigitsPipeline, load_digits_scheduler_config
    from fewstep.models.students import load_digits_student_pipeline

    p = Path(path)
    folder = p / "final" if (p / "checkpoints").is_dir() else p
    if not folder.is_dir():
        raise FileNotFoundError(f"template {folder} does not exist (a finished run has final/; else pass --template)")
    name = _student_name(folder)
    if name is not None:
        info = json.loads((folder / f"digits_{name}.json").read_text())
        pipe = load_digits_student_pipeline(name, device=device, weights_dir=folder)
        return Template(pipe, "digits-student", name, folder, info["scheduler"], info.get("guidance_range"),
                        info.get("training") or {})
    for f in (folder / "config.json", folder / "unet" / "config.json"):
        if f.is_file() and json.loads(f.read_text()).get("_class_name") == "UNet2DModel":
            unet = UNet2DModel.from_pretrained(str(f.parent)).to(device).eval().requires_grad_(False)
            pipe = DigitsPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(
                load_digits_scheduler_config()))
            pipe.set_progress_bar_config(disable=True)
            return Template(pipe, "digits-teacher", f.parent.name, f.parent)
    raise ValueError(f"template {folder}: not a trainer run with final/, an exported digits student or a "
                     "diffusers UNet2DModel folder")


def save_merged(template: Template, output: str | os.PathLike, name: str, record: dict) -> Path:
    """Write the model of ``template`` (holding the merged weights) to ``output``: ``unet/`` (a diffusers
    model folder, ``from_pretrained``-loadable) and, for digits students, ``digits_<name>_unet.safetensors``
    + ``digits_<name>.json`` (``load_digits_student_pipeline(name, weights_dir=output)``; copy both
    into ``fewstep/models/weights/`` to ship), plus ``lcsc.json`` (``record``). Atomic per file."""
    from fewstep.models.students import save_digits_student

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model = template.model
    if template.kind == "digits-student":
        save_digits_student(name, model, template.scheduler_config, out, template.guidance_range,
                            {**(template.record or {}), "lcsc": record})
    tmp = out / ".tmp-unet"
    model.save_pretrained(str(tmp))
    if (out / "unet").exists():
        import shutil

        shutil.rmtree(out / "unet")
    os.replace(tmp, out / "unet")
    atomic_write_json(out / "lcsc.json", record, indent=1)
    return out
