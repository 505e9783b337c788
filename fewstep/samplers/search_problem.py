"""What ``fewstep search`` scores schedules on: a model, its scheduler config, fixed batches of start
noise with their conditions, and the reference the candidates are compared with.

:class:`SearchProblem` holds a model with fewstep's call convention ``model(x, t, c) -> raw output``
(:func:`fewstep.sample`), and builders make one for the bundled digits teacher
(:func:`digits_problem`), a local diffusers pipeline folder (:func:`pipeline_problem`: text-to-image
UNet pipelines with prompts, unconditional/class UNet pipelines) or a ``module:callable``
(:func:`callable_problem`). The reference of a batch is a many-step deterministic solve
(DPM-Solver++ 2M on every training time by default) unless the problem brings its own
(``reference_fn``, e.g. the exact ODE solution of :mod:`fewstep.testing`).
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

REFERENCE_SPACING = "trailing"  # starts at t_max on every schedule kind, as the searched schedules do


@dataclass
class Batch:
    """Start noise ``(B, *shape)`` (float32 unless the problem says otherwise) and the conditions of
    the two guidance branches (objects the model takes; tensors with a leading batch dimension are
    sliced with the noise)."""

    noise: torch.Tensor
    cond: Any = None
    uncond: Any = None

    def __len__(self) -> int:
        return self.noise.shape[0]

    def rows(self, index) -> "Batch":
        """The sub-batch of rows ``index`` (a slice or index tensor)."""
        return Batch(self.noise[index], _take(self.cond, index, len(self)), _take(self.uncond, index, len(self)))


def _take(obj, index, n: int):
    if isinstance(obj, torch.Tensor) and obj.ndim > 0 and obj.shape[0] == n:
        return obj[index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(o, index, n) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _take(v, index, n) for k, v in obj.items()}
    return obj


@dataclass
class SearchProblem:
    """A model and how to draw batches for it.

    Attributes:
        model: ``model(x, t, c) -> raw output`` of ``scheduler_config["prediction_type"]``.
        scheduler_config: the model's diffusers scheduler config (noise schedule, prediction type).
        make_batch: ``make_batch(n, seed) -> Batch`` (the same ``(n, seed)`` gives the same batch).
        guidance_scale: classifier-free guidance ``w`` (``uncond + w (cond - uncond)``; 1: none).
        name: recorded in logs and schedules; a resumed search must have the same.
        ems, ems_name: EMS for ``v3`` steps (None: no v3 in the search space).
        mean_x0: the data mean for the ``mean_x0`` analytical first step (None: not offered).
        reference_fn: ``reference_fn(batch) -> x`` replacing the many-step reference solve.
        fd_fn: ``fd_fn(samples, batch) -> float`` (the FD proxy; None: not offered).
        dtype: noise dtype.
    """

    model: Callable
    scheduler_config: Mapping[str, Any]
    make_batch: Callable[[int, int], Batch]
    guidance_scale: float = 1.0
    name: str = "model"
    ems: Any = None
    ems_name: str | None = None
    mean_x0: torch.Tensor | None = None
    reference_fn: Callable[[Batch], torch.Tensor] | None = None
    fd_fn: Callable[[torch.Tensor, Batch], float] | None = None
    dtype: torch.dtype = torch.float32
    info: dict = field(default_factory=dict)

    @property
    def guidance(self):
        """The ``guidance`` argument of :func:`fewstep.sample` (None when ``w = 1``)."""
        return None if float(self.guidance_scale) == 1.0 else float(self.guidance_scale)

    def sample(self, scheduler, batch: Batch, steps: int | None = None, progress: bool = False) -> torch.Tensor:
        """Run ``scheduler`` from ``batch`` for ``steps`` steps (None: a USF schedule's own points)."""
        from ..sample import sample

        with torch.no_grad():
            x, _ = sample(self.model, batch.noise, scheduler, steps, guidance=self.guidance, cond=batch.cond,
                          uncond=batch.uncond, progress=progress)
        return x

    def reference(self, batch: Batch, steps: int = 1000, progress: bool = False) -> torch.Tensor:
        """The reference end points of ``batch``: ``reference_fn`` when given, else a ``steps``-step
        DPM-Solver++ 2M solve on the trailing grid at exact model times (1000 steps on a 1000-step
        model: every training time), ending with the data prediction."""
        if self.reference_fn is not None:
            return self.reference_fn(batch)
        from .dpmpp import DPMSolverPPScheduler

        sched = DPMSolverPPScheduler.from_config(dict(self.scheduler_config), solver_order=2,
                                                 timestep_spacing=REFERENCE_SPACING, round_timesteps=False,
                                                 final_sigmas_type="zero")
        return self.sample(sched, batch, int(steps), progress=progress)


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def _balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat(n // num_classes + 1)[:n]


def digits_problem(guidance_scale: float = 1.0, device="cpu", ems: Any = "auto") -> SearchProblem:
    """The bundled digits teacher (v-prediction, cosine schedule): labels cycle over the ten classes,
    the null class 10 is the unconditional branch; ``mean_x0`` is the training split's mean image; EMS
    default to the shipped set of the guidance scale (``digits`` at w = 1, ``digits-cfg2`` at w = 2,
    none otherwise; ``ems=None`` turns v3 off). The FD proxy is FD-digits against the held-out test
    digits (``fewstep.eval.fd_digits``)."""
    from ..models import load_digits_split
    from ..models.pipeline import NULL_CLASS, load_digits_scheduler_config, load_digits_teacher_unet

    unet = load_digits_teacher_unet(device)

    def model(x, t, c):
        t_in = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        return unet(x, t_in, class_labels=c).sample

    def make_batch(n: int, seed: int) -> Batch:
        labels = _balanced_labels(n, 10).to(device)
        noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
        return Batch(noise, labels, torch.full_like(labels, NULL_CLASS))

    if ems == "auto":
        ems = {1.0: "digits", 2.0: "digits-cfg2"}.get(float(guidance_scale))
    ems_obj = _load_ems(ems, load_digits_scheduler_config())
    x_train, _ = load_digits_split("train")
    state = {}

    def fd_fn(samples: torch.Tensor, batch: Batch) -> float:
        from ..eval.fd_digits import DigitsFeatures, fd_digits

        if "extractor" not in state:
            state["extractor"] = DigitsFeatures()
            state["test"] = load_digits_split("test")[0]
        res = fd_digits((samples.float().clamp(-1, 1).cpu() + 1) / 2, labels=batch.cond.cpu(),
                        extractor=state["extractor"], reference=state["test"])
        return float(res["fd"])

    return SearchProblem(model=model, scheduler_config=dict(load_digits_scheduler_config()), make_batch=make_batch,
                         guidance_scale=float(guidance_scale), name="digits", ems=ems_obj,
                         ems_name=ems if isinstance(ems, str) else None, mean_x0=x_train.mean(0), fd_fn=fd_fn)


def _load_ems(ems, scheduler_config):
    if ems is None:
        return None
    from ..schedule import NoiseSchedule
    from .ems import EMS, resolve_ems_path

    obj = ems if isinstance(ems, EMS) else EMS.load(resolve_ems_path(ems))
    obj.check_schedule(NoiseSchedule.from_config(dict(scheduler_config)))
    return obj


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a prompt file; ``ValueError`` when there are none."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts file {str(path)!r} does not exist")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts file {str(path)!r} has no prompts (one per line)")
    return prompts


def pipeline_problem(folder: str | Path, prompts: list[str] | None = None, guidance_scale: float = 1.0,
                     device="cpu", ems: Any = None, negative_prompt: str = "") -> SearchProblem:
    """A local diffusers pipeline folder (``model_index.json``; loaded offline). Text-to-image UNet
    pipelines (Stable Diffusion 1/2 style: ``encode_prompt``) need ``prompts`` (cycled over the batch;
    the unconditional branch is ``negative_prompt``); UNet pipelines without text (``DDPMPipeline``)
    take none. Samples are the UNet's latents/images at ``unet.config.sample_size``."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {str(folder)!r} is not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True).to(device)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no unet; fewstep search takes UNet pipelines (or a "
                         "module:callable model)")
    unet.eval().requires_grad_(False)
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    shape = (unet.config.in_channels, *size)
    text = hasattr(pipe, "encode_prompt") and getattr(unet.config, "cross_attention_dim", None) is not None
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise ValueError(f"{type(pipe).__name__}: UNets with added conditions (SDXL) are not supported by fewstep "
                         "search's pipeline loader; pass a module:callable model")
    if text and not prompts:
        raise ValueError(f"{type(pipe).__name__} is a text-to-image pipeline: pass --prompts FILE (one prompt a line)")
    embeds = {}
    if text:
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True, [negative_prompt] * len(prompts))
        embeds = {"cond": cond, "uncond": uncond}

        def model(x, t, c):
            t_in = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
            return unet(x, t_in, encoder_hidden_states=c).sample
    else:
        def model(x, t, c):
            t_in = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
            return unet(x, t_in).sample

    def make_batch(n: int, seed: int) -> Batch:
        noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
        if not embeds:
            return Batch(noise)
        idx = torch.arange(n) % embeds["cond"].shape[0]
        return Batch(noise, embeds["cond"][idx], embeds["uncond"][idx])

    return SearchProblem(model=model, scheduler_config=dict(pipe.scheduler.config), make_batch=make_batch,
                         guidance_scale=float(guidance_scale), name=str(folder),
                         ems=_load_ems(ems, pipe.scheduler.config), ems_name=ems if isinstance(ems, str) else None,
                         info={"pipeline": type(pipe).__name__, "prompts": len(prompts or [])})


def callable_problem(spec: str, guidance_scale: float | None = None, ems: Any = None) -> SearchProblem:
    """``module:callable`` returning a :class:`SearchProblem`, or a dict with ``model``,
    ``scheduler_config``, ``shape`` (one sample) and optionally ``cond``, ``uncond`` (one per sample
    or shared), ``guidance_scale``, ``mean_x0``, ``ems``, ``reference_fn``, ``dtype``, ``name``."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"--model {spec!r} must be 'digits', a pipeline folder or module:callable")
    try:
        out = getattr(importlib.import_module(mod), fn)()
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--model {spec!r}: cannot load {fn!r} from module {mod!r}: {err}") from None
    if isinstance(out, SearchProblem):
        problem = out
    elif isinstance(out, Mapping):
        missing = [k for k in ("model", "scheduler_config", "shape") if k not in out]
        if missing:
            raise ValueError(f"--model {spec!r} returned a dict without {missing}")
        shape, dtype = tuple(out["shape"]), out.get("dtype", torch.float32)
        cond, uncond = out.get("cond"), out.get("uncond")

        def make_batch(n: int, seed: int) -> Batch:
            noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
            return Batch(noise, _cycle(cond, n), _cycle(uncond, n))

        problem = SearchProblem(model=out["model"], scheduler_config=dict(out["scheduler_config"]),
                                make_batch=make_batch, guidance_scale=float(out.get("guidance_scale", 1.0)),
                                name=str(out.get("name", spec)), mean_x0=out.get("mean_x0"),
                                reference_fn=out.get("reference_fn"), dtype=dtype)
        ems = ems if ems is not None else out.get("ems")
    else:
        raise ValueError(f"--model {spec!r} must return a SearchProblem or a dict, got {type(out).__name__}")
    if guidance_scale is not None:
        problem.guidance_scale = float(guidance_scale)
    if ems is not None:
        problem.ems = _load_ems(ems, problem.scheduler_config)
        problem.ems_name = ems if isinstance(ems, str) else problem.ems_name
    return problem


def _cycle(obj, n: int):
    """Per-sample conditions repeated to ``n`` rows (tensors); anything else as is."""
    if isinstance(obj, torch.Tensor) and obj.ndim > 0:
        return obj[torch.arange(n) % obj.shape[0]]
    return obj


def mixture_problem(dim: int = 16, seed: int = 0, config: Mapping | None = None, classes: bool = False,
                    guidance_scale: float = 1.0, exact_reference: bool = True) -> SearchProblem:
    """The exact Gaussian-mixture model of :mod:`fewstep.testing` (float64) under Stable Diffusion's VP
    schedule (``config``): ``reference_fn`` is the exact ODE end point (DOP853), ``mean_x0`` the
    mixture's mean. With ``classes``, labels cycle over the mixture's classes (null class -1)."""
    from ..schedule import NoiseSchedule
    from ..testing import GaussianMixtureModel, make_gaussian_mixture, reference_solve

    cfg = dict(config or {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                          "prediction_type": "epsilon"})
    mix = make_gaussian_mixture(dim=dim, seed=seed)
    sched = NoiseSchedule.from_config(cfg)
    model = GaussianMixtureModel(mix, sched, cfg.get("prediction_type", "epsilon"))
    t0 = float(sched.t_max)

    def make_batch(n: int, s: int) -> Batch:
        noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        if not classes:
            return Batch(noise)
        labels = _balanced_labels(n, mix.num_classes)
        return Batch(noise, labels, torch.full_like(labels, -1))

    def reference_fn(batch: Batch) -> torch.Tensor:
        if guidance_scale != 1.0:
            raise ValueError("the exact reference is the unguided ODE; use exact_reference=False with guidance")
        s0 = math.exp(-float(sched.lambda_(t0)))
        return reference_solve(mix, batch.noise * float(sched.init_noise_sigma) / float(sched.alpha(t0)), s0, 0.0,
                               c=batch.cond)

    mean = (mix.weights.double()[:, None] * mix.means.double()).sum(0)
    return SearchProblem(model=model, scheduler_config=cfg, make_batch=make_batch,
                         guidance_scale=float(guidance_scale), name=f"mixture-d{dim}-s{seed}",
                         mean_x0=mean, reference_fn=reference_fn if exact_reference else None, dtype=torch.float64,
                         info={"config": json.loads(json.dumps(cfg))})
