"""Distilled digits students: the guidance-embedding UNet, the student pipeline and the shipped weights.

* :class:`GuidanceUNet2DModel` -- the digits teacher's ``UNet2DModel`` with LCM's guidance-scale
  input (Luo et al. 2023, Sec. 4.2; diffusers' ``time_cond_proj_dim``): a bias-free linear map of
  the sinusoidal embedding of ``w`` is added to the sinusoidal timestep embedding before the
  time MLP, exactly where ``UNet2DConditionModel(time_cond_proj_dim=...)`` adds it. diffusers'
  ``UNet2DModel`` has no such input, and ``UNet2DConditionModel`` cannot hold the teacher's middle
  block (it builds one resnet, the teacher has two), so the student wraps the teacher's class.
  :meth:`GuidanceUNet2DModel.from_teacher` copies every teacher weight and sets the new projection
  to zero: at initialisation the student *is* the teacher for every ``w``.
* :func:`guidance_scale_embedding` -- the VDM-style sinusoidal embedding of ``w * 1000`` used by
  LCM (``LatentConsistencyModelPipeline.get_guidance_scale_embedding``).
* :class:`DigitsStudentPipeline` -- a :class:`fewstep.models.DigitsPipeline` whose model is a
  consistency student, called like the teacher's pipeline; it samples with the student's own
  :class:`fewstep.distill.consistency.ConsistencyScheduler` (one model call per step).
* Shipped students (``load_digits_pipeline(student=...)``): ``"cd"`` (consistency distillation of
  the teacher's unguided class-conditional ODE; ``guidance_scale`` must be 1) and ``"lcm"`` (LCM
  student with a guidance-scale embedding; ``guidance_scale`` within its training range).
  ``"fdistill"`` and ``"disback"``: one-step generators by distribution matching (f-distill with
  Jensen-Shannon, DisBack with reverse KL; docs/fdistill.md), sampled with ``num_inference_steps=1``.
  Files: ``weights/digits_<name>_unet.safetensors`` and ``weights/digits_<name>.json`` (model
  class and config, scheduler config, guidance range and the training record).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding

from .adapters import Denoiser
from .pipeline import WEIGHTS_DIR, DigitsPipeline

# cd-lcsc: LCSC merge of the cd run's checkpoints (docs/lcsc.md); fdistill, disback: docs/fdistill.md
STUDENTS = ("cd", "lcm", "cd-lcsc", "fdistill", "disback")


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding (B, embedding_dim) of guidance scales ``w`` (B,), LCM's ``w``-condition:
    ``[sin(1000 w f_j), cos(1000 w f_j)]`` with ``f_j = exp(-j log(10000) / (d/2 - 1))``, zero-padded
    for odd ``d`` (Luo et al. 2023; VDM, Kingma et al. 2021, App. B). ``w`` is in LCM's convention,
    ``w = guidance_scale - 1`` for diffusers' ``guidance_scale``."""
    w = torch.as_tensor(w)
    if w.ndim != 1:
        raise ValueError(f"w must be a 1-D tensor of guidance scales, got shape {tuple(w.shape)}")
    if embedding_dim < 2:
        raise ValueError(f"embedding_dim must be >= 2, got {embedding_dim}")
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    arg = (w.to(dtype) * 1000.0)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class _CondTimestepEmbedding(TimestepEmbedding):
    """``TimestepEmbedding`` that reads its ``condition`` from ``pending`` when called without one
    (``UNet2DModel.forward`` calls ``time_embedding(t_emb)`` with no condition argument)."""

    pending: torch.Tensor | None = None

    def forward(self, sample, condition=None):
        if condition is None and self.pending is not None:
            condition = self.pending.to(sample.dtype)
        return super().forward(sample, condition)


def _unet_kwargs(config: dict) -> dict:
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in cfg and cfg[key] is not None:
            cfg[key] = tuple(cfg[key])
    return cfg


class GuidanceUNet2DModel(ModelMixin, ConfigMixin):
    """A ``UNet2DModel`` (config ``unet_config``) with a guidance-scale input ``timestep_cond``
    (B, ``time_cond_proj_dim``), see the module docstring. Call as
    ``model(x, t, class_labels=y, timestep_cond=guidance_scale_embedding(w, dim))``; without
    ``timestep_cond`` it is the plain UNet."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet_config: dict | None = None, time_cond_proj_dim: int = 64):
        super().__init__()
        if not unet_config:
            raise ValueError("GuidanceUNet2DModel needs the unet_config of the UNet2DModel it extends")
        if not isinstance(time_cond_proj_dim, int) or time_cond_proj_dim < 2:
            raise ValueError(f"time_cond_proj_dim must be an integer >= 2, got {time_cond_proj_dim!r}")
        self.unet = UNet2DModel(**_unet_kwargs(unet_config))
        old = self.unet.time_embedding
        self.unet.time_embedding = _CondTimestepEmbedding(
            old.linear_1.in_features, old.linear_2.out_features, cond_proj_dim=time_cond_proj_dim)
        # what pipelines read from ``unet.config`` (not __init__ arguments: from_config ignores them)
        uc = self.unet.config
        self.register_to_config(sample_size=uc.sample_size, in_channels=uc.in_channels, out_channels=uc.out_channels)

    @classmethod
    def from_teacher(cls, teacher: UNet2DModel, time_cond_proj_dim: int = 64) -> "GuidanceUNet2DModel":
        """A student holding a copy of every ``teacher`` weight and a zero guidance projection."""
        model = cls(unet_config=dict(teacher.config), time_cond_proj_dim=time_cond_proj_dim)
        missing, unexpected = model.unet.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected or missing != ["time_embedding.cond_proj.weight"]:
            raise ValueError(f"teacher weights do not fit the student: missing {missing}, unexpected {unexpected}")
        torch.nn.init.zeros_(model.unet.time_embedding.cond_proj.weight)
        model = model.to(teacher.device)
        return model if teacher.dtype == torch.float32 else model.to(teacher.dtype)

    def forward(self, sample, timestep, class_labels=None, timestep_cond=None, return_dict: bool = True):
        emb = self.unet.time_embedding
        emb.pending = timestep_cond
        try:
            return self.unet(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            emb.pending = None


class _StudentModel(Denoiser):
    """A student UNet as ``model(x, t, c)``; ``guidance_scale`` (diffusers convention) is passed as the
    ``timestep_cond`` embedding of ``w = guidance_scale - 1`` (LCM, Luo et al. 2023, Sec. 4.2), None for
    students without a guidance input."""

    def __init__(self, unet, guidance_scale=None):
        super().__init__(unet, None)
        self.guidance_scale = guidance_scale

    def _net_kwargs(self, x):
        if self.guidance_scale is None:
            return {}
        w = torch.full((x.shape[0],), self.guidance_scale - 1.0, device=x.device)
        return {"timestep_cond": guidance_scale_embedding(w, self.net.config.time_cond_proj_dim).to(self.dtype)}


class DigitsStudentPipeline(DigitsPipeline):
    """A digits consistency student as a pipeline, called exactly like the teacher's
    :class:`~fewstep.models.DigitsPipeline` (``class_labels``, ``num_inference_steps``,
    ``guidance_scale``, ``generator``, ``output_type``, ``latents``...), one model call per step.

    ``guidance_range``: ``None`` for a student without guidance input (CD), then ``guidance_scale``
    must be 1; else ``(lo, hi)``, the diffusers-convention guidance scales the student was trained
    on, and ``guidance_scale`` in that range is fed as the embedding of ``w = guidance_scale - 1``.
    ``scheduler``: :class:`~fewstep.distill.consistency.ConsistencyScheduler` (default) or, for a
    student with ``"lcm"`` boundary scalings, diffusers' ``LCMScheduler``.
    """

    def __init__(self, unet, scheduler, guidance_range=None):
        super().__init__(unet=unet, scheduler=scheduler)
        self.guidance_range = tuple(guidance_range) if guidance_range is not None else None

    def _sampling_model(self, guidance_scale, guidance=None):
        """The student as ``model(x, t, c)``: one pass per step, the guidance scale (if any) fed as the
        embedding of ``w = guidance_scale - 1``; no guidance rule on top."""
        if guidance is not None:
            raise ValueError("guidance=: a distilled student has its guidance built in; use guidance_scale")
        return _StudentModel(self.unet, None if self.guidance_range is None else guidance_scale), None

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 4, guidance_scale: float = 1.0, **kwargs):
        """Generate like :meth:`DigitsPipeline.__call__` (same arguments and output); ``guidance_scale``
        is checked against what the student was trained for (see the class docstring)."""
        try:
            g = float(guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}") from None
        if self.guidance_range is None and g != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale!r}: this student was distilled from the unguided "
                             "teacher (w = 1) and has no guidance input; use guidance_scale=1.0 "
                             "(the 'lcm' student takes a guidance scale)")
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            if not lo - 1e-9 <= g <= hi + 1e-9:
                raise ValueError(f"guidance_scale={guidance_scale!r} is outside the range this student was "
                                 f"trained on, [{lo:g}, {hi:g}]")
        return super().__call__(class_labels, num_inference_steps=num_inference_steps, guidance_scale=g, **kwargs)


def student_files(name: str, weights_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(weights, json)`` paths of the student ``name`` in ``weights_dir`` (default: package weights)."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return d / f"digits_{name}_unet.safetensors", d / f"digits_{name}.json"


def save_digits_student(name: str, unet: torch.nn.Module, scheduler_config: dict, out_dir,
                        guidance_range=None, record: dict | None = None) -> tuple[Path, Path]:
    """Write a digits student as ``digits_<name>_unet.safetensors`` + ``digits_<name>.json`` into
    ``out_dir`` (the format :func:`load_digits_student` reads). Atomic per file."""
    from safetensors.torch import save_file

    from .train import _json_config

    weights, meta = student_files(name, out_dir)
    weights.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(unet, GuidanceUNet2DModel):
        model_class, model_config = "GuidanceUNet2DModel", {"unet_config": _json_config(unet.unet.config),
                                                            "time_cond_proj_dim": unet.config.time_cond_proj_dim}
    elif isinstance(unet, UNet2DModel):
        model_class, model_config = "UNet2DModel", _json_config(unet.config)
    else:
        raise ValueError(f"a digits student must be a UNet2DModel or GuidanceUNet2DModel, got {type(unet).__name__}")
    state = {k: v.detach().float().contiguous().cpu() for k, v in unet.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)  # package data: readable by everyone
    os.replace(tmp, weights)
    info = {"name": name, "model_class": model_class, "model_config": model_config,
            "scheduler": {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")},
            "guidance_range": list(guidance_range) if guidance_range is not None else None,
            "training": record or {}}
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, meta)
    return weights, meta


def load_digits_student(name: str, device: str | torch.device = "cpu", weights_dir=None):
    """``(unet, scheduler_config, guidance_range)`` of the student ``name`` ("cd", "lcm") from
    ``weights_dir`` (default: the package weights), offline; the UNet is in eval mode without grads."""
    from safetensors.torch import load_file

    weights, meta = student_files(name, weights_dir)
    if weights_dir is None and name not in STUDENTS:
        raise ValueError(f"student={name!r} is not a shipped digits student; allowed: {', '.join(STUDENTS)}")
    for f in (weights, meta):
        if not f.exists():
            raise FileNotFoundError(f"digits student file {f} is missing; train it with `fewstep distill` "
                                    "(see docs/distill.md) or reinstall fewstep")
    info = json.loads(meta.read_text())
    if info["model_class"] == "GuidanceUNet2DModel":
        unet = GuidanceUNet2DModel(**info["model_config"])
    elif info["model_class"] == "UNet2DModel":
        unet = UNet2DModel(**_unet_kwargs(info["model_config"]))
    else:
        raise ValueError(f"{meta}: unknown model_class {info['model_class']!r}")
    unet.load_state_dict(load_file(str(weights)))
    unet = unet.to(device).eval().requires_grad_(False)
    return unet, info["scheduler"], info.get("guidance_range")


def load_digits_student_pipeline(name: str, device: str | torch.device = "cpu", scheduler=None,
                                 weights_dir=None) -> DigitsStudentPipeline:
    """The student ``name`` as a :class:`DigitsStudentPipeline` (see :func:`load_digits_pipeline`).

    ``scheduler``: ``None`` (the student's :class:`~fewstep.distill.consistency.ConsistencyScheduler`),
    that class, or diffusers' ``LCMScheduler`` (class or instance) for a student with ``"lcm"``
    boundary scalings. Anything else is a ``ValueError``: a consistency student's output only
    means something under its own boundary scalings.
    """
    from diffusers import LCMScheduler

    from ..distill.consistency import ConsistencyScheduler

    unet, sched_cfg, guidance_range = load_digits_student(name, device, weights_dir)
    if scheduler is None or scheduler is ConsistencyScheduler:
        scheduler = ConsistencyScheduler.from_config(sched_cfg)
    elif scheduler is LCMScheduler or isinstance(scheduler, LCMScheduler):
        if sched_cfg.get("boundary") != "lcm":
            raise ValueError(f"student {name!r} uses {sched_cfg.get('boundary')!r} boundary scalings; "
                             "LCMScheduler only fits students trained with 'lcm' scalings")
        if scheduler is LCMScheduler:
            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                    "timestep_scaling", "original_inference_steps", "clip_sample")
            scheduler = LCMScheduler(**{k: sched_cfg[k] for k in keys if k in sched_cfg})
    elif not isinstance(scheduler, ConsistencyScheduler):
        raise ValueError("a digits student samples with ConsistencyScheduler (default) or, for the 'lcm' student, "
                         f"LCMScheduler; got {scheduler!r}")
    pipe = DigitsStudentPipeline(unet=unet, scheduler=scheduler, guidance_range=guidance_range)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
