"""Consistency distillation: CD (Song et al. 2023), LCM (Luo et al. 2023) and LCM-LoRA (Luo et al. 2023b).

All three minimise, over a grid ``t_0 < ... < t_N`` with skip ``k`` (Song et al. 2023, Eq. 7;
Luo et al. 2023, Eq. 10)::

    L = E_{x0, n, z} d( f_theta(x_{t_{n+k}}, t_{n+k}),  f_{theta^-}(x_hat_{t_n}, t_n) )
    x_{t_{n+k}} = alpha x0 + sigma z,     x_hat_{t_n} = Phi_teacher(x_{t_{n+k}}; t_{n+k} -> t_n)

with ``f`` the consistency function of :mod:`fewstep.distill.consistency`, ``Phi`` one solver step
of the teacher's PF-ODE (:mod:`fewstep.distill.solvers`), ``theta^-`` the target network (an EMA
of ``theta`` with rate ``mu``, Song et al. Alg. 2; ``mu = 0`` is the stop-gradient student) and
``d`` the l2 or pseudo-Huber distance ``sqrt(||a - b||^2 + c^2) - c`` (Song & Dhariwal 2023, iCT,
Sec. 3.3; ``c = 0.00054 sqrt(dim)``).

* ``cd``: the student is a copy of the teacher; the teacher runs at a fixed guidance scale
  (``guidance``, 1 = the plain conditional ODE); CM boundary scalings by default.
* ``lcm``: the teacher step has classifier-free guidance inside, ``uncond + w (cond - uncond)``
  with ``w ~ U[guidance_range]`` per sample (diffusers' convention; the LCM paper's ``w`` is
  ``guidance_scale - 1``), and the student gets ``w`` through a guidance-scale embedding
  (``time_cond_proj_dim``, zero-initialised); LCM boundary scalings, LCM's 50-point DDIM grid.
* ``lcm-lora``: like ``lcm`` but the student is the teacher with LoRA adapters (only they train),
  no guidance embedding (the guidance range is baked in), and no target network: the target is the
  same LoRA'd model under ``no_grad`` (as diffusers' LCM-LoRA script does).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from ...schedule import to_x0_eps
from ..config import Option
from ..consistency import (
    BOUNDARIES,
    GRID_SPACINGS,
    ConsistencyScheduler,
    boundary_scalings,
    sampling_timesteps,
    training_grid,
)
from ..solvers import SOLVERS, teacher_solve
from ..sources import LCM_LORA_TARGETS, cat_cond, index_cond
from .base import Method, Phase

LOSSES = ("pseudo_huber", "huber_elementwise", "l2")


def _range_check(v) -> str | None:
    return None if v[0] <= v[1] else "needs low <= high"


COMMON = {
    "solver": Option("ddim", "str", "teacher ODE solver between grid points", choices=SOLVERS),
    "solver_substeps": Option(1, "int", "solver sub-steps per teacher step", low=1),
    "solver_scheduler": Option(None, "str", "scheduler class for solver='scheduler' (fewstep.samplers or "
                               "diffusers name)", nullable=True),
    "solver_scheduler_options": Option({}, "dict", "keyword overrides for that scheduler's config"),
    "grid_spacing": Option("trailing", "str", "spacing of the distillation grid", choices=GRID_SPACINGS),
    "grid_steps": Option(50, "int", "grid points besides the boundary t_0", low=2, high=1000),
    "grid_power": Option(1.3, "float", "exponent of grid_spacing='time_power'", low=0, low_open=True),
    "skip": Option(1, "int", "grid intervals per teacher step (k)", low=1),
    "loss": Option("pseudo_huber", "str", "distance d", choices=LOSSES),
    "huber_c": Option(None, "float", "pseudo-Huber c (null: 0.00054 sqrt(dim), iCT)", low=0, low_open=True,
                      nullable=True),
    "sigma_data": Option(0.5, "float", "data std in the boundary scalings", low=0, low_open=True),
    "timestep_scaling": Option(10.0, "float", "LCM boundary: t is scaled by this", low=0, low_open=True),
}


class ConsistencyDistillation(Method):
    """CD (see the module docstring); :class:`LCM` and :class:`LCMLoRA` change the defaults and the
    student."""

    name = "cd"
    student_kind = "copy"
    options = {
        **COMMON,
        "boundary": Option("cm", "str", "boundary scalings", choices=BOUNDARIES),
        "target_ema": Option(0.95, "float", "target network EMA rate mu (0: stop-gradient student)", low=0,
                             high=1, high_open=True),
        "guidance": Option(1.0, "float", "fixed teacher guidance scale (1: conditional ODE, no CFG)", low=1),
    }

    @classmethod
    def check(cls, cfg: dict) -> None:
        o = cfg["method"]
        if o["skip"] > o["grid_steps"]:
            raise ValueError(f"config key 'method.skip' = {o['skip']} must be <= method.grid_steps = {o['grid_steps']}")
        if o["solver"] == "scheduler":
            if not o["solver_scheduler"]:
                raise ValueError("config key 'method.solver_scheduler' is required when method.solver = 'scheduler'")
            _scheduler_class(o["solver_scheduler"])
        elif o["solver_scheduler"]:
            raise ValueError(f"config key 'method.solver_scheduler' = {o['solver_scheduler']!r} needs "
                             f"method.solver = 'scheduler' (it is {o['solver']!r})")
        if o.get("boundary") == "lcm" and o["grid_spacing"] not in ("trailing", "linspace", "leading"):
            raise ValueError("LCM boundary scalings read the integer timestep; use them with a uniform grid "
                             f"(method.grid_spacing = 'trailing'), not {o['grid_spacing']!r}")

    # ---- setup -----------------------------------------------------------------------------------
    def build(self) -> dict[str, torch.nn.Module]:
        src, o = self.source, self.opts
        self.grid = torch.as_tensor(training_grid(src.schedule, o["grid_steps"], o["grid_spacing"], o["grid_power"]))
        self.dim = math.prod(src.sample_shape)
        self.huber_c = o["huber_c"] if o["huber_c"] is not None else 0.00054 * math.sqrt(self.dim)
        self.solver_scheduler = None
        if o["solver"] == "scheduler":
            cls = _scheduler_class(o["solver_scheduler"])
            self.solver_scheduler = cls.from_config({**src.scheduler_config, **o["solver_scheduler_options"]})
        self.embedding_dim = None
        if self.student_kind == "guidance":
            self.embedding_dim = o["w_embedding_dim"] or (64 if src.name == "digits" else 256)
        lora = None
        if self.student_kind == "lora":
            lora = {"rank": o["lora_rank"], "alpha": o["lora_alpha"] or o["lora_rank"],
                    "targets": o["lora_targets"], "dropout": o["lora_dropout"]}
        student = src.build_student(self.student_kind, time_cond_proj_dim=self.embedding_dim or 64, lora=lora)
        self.target = None
        if self.target_rate() > 0:
            self.target = copy.deepcopy(student).eval().requires_grad_(False)
        return {"student": student}

    def target_rate(self) -> float:
        return self.opts["target_ema"]

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {"target": self.target} if self.target is not None else {}

    def guidance_range(self) -> tuple[float, float] | None:
        """The diffusers-convention guidance scales the student is trained for (None: fixed)."""
        return None

    # ---- one step --------------------------------------------------------------------------------
    def draw(self, phase: Phase, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        k, big_n = self.opts["skip"], len(self.grid) - 1
        out = {"index": torch.randint(k, big_n + 1, (n,), generator=generator),
               "noise": torch.randn((n, *self.source.sample_shape), generator=generator)}
        rng = self.guidance_range()
        if rng is not None:
            out["w"] = rng[0] + (rng[1] - rng[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
        return out

    def _w(self, batch) -> torch.Tensor:
        n = batch["index"].shape[0]
        if "w" in batch:
            return batch["w"].to(self.device)
        return torch.full((n,), float(self.opts.get("guidance", 1.0)), dtype=torch.float64, device=self.device)

    def _levels(self, t: torch.Tensor, ref: torch.Tensor):
        s = self.source.schedule
        tc = t.double().cpu()
        a = torch.as_tensor(s.alpha(tc), dtype=ref.dtype, device=ref.device).reshape(-1, *([1] * (ref.ndim - 1)))
        sg = torch.as_tensor(s.sigma(tc), dtype=ref.dtype, device=ref.device).reshape(-1, *([1] * (ref.ndim - 1)))
        return a, sg

    def _timestep_cond(self, w: torch.Tensor):
        if self.embedding_dim is None:
            return None
        from fewstep.models.students import guidance_scale_embedding

        return guidance_scale_embedding((w - 1.0).float(), self.embedding_dim).to(self.device)

    def consistency(self, model, x, t, cond, w) -> torch.Tensor:
        """``f(x, t)`` of ``model`` (the student, the target or the online student) on a micro-batch."""
        o = self.opts
        raw = self.source.call(model, x, t, cond, timestep_cond=self._timestep_cond(w))
        a, s = self._levels(t, x)
        x0_hat, _ = to_x0_eps(raw, x, a, s, self.source.prediction_type)
        c_skip, c_out = boundary_scalings(t, self.source.schedule, o["boundary"], o["sigma_data"],
                                          o["timestep_scaling"], float(self.grid[0]))
        shape = (-1, *([1] * (x.ndim - 1)))
        return c_skip.to(x).reshape(shape) * x + c_out.to(x).reshape(shape) * x0_hat

    def teacher_fn(self, cond: dict, w: torch.Tensor):
        """``teacher(x, t, rows) -> raw output`` with classifier-free guidance ``uncond + w (cond - uncond)``
        per sample (one pass where every ``w`` is 1)."""
        src = self.source
        guided = bool((w != 1.0).any())

        def teacher(x, t, rows):
            c = index_cond(cond, rows)
            if not guided:
                return src.call(src.teacher, x, t, c)
            n = x.shape[0]
            out = src.call(src.teacher, torch.cat([x, x]), torch.cat([t, t]), cat_cond(c, src.null_cond(n)))
            oc, ou = out.chunk(2)
            wr = w[rows].to(x).reshape(-1, *([1] * (x.ndim - 1)))
            return ou + wr * (oc - ou)

        return teacher

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = (pred.float() - target.float()).flatten(1)
        if self.opts["loss"] == "l2":
            return diff.square().mean()
        c = self.huber_c
        if self.opts["loss"] == "huber_elementwise":
            return (torch.sqrt(diff.square() + c * c) - c).mean()
        return (torch.sqrt(diff.square().sum(1) + c * c) - c).mean()

    def loss(self, phase: Phase, batch: dict, step: int):
        o = self.opts
        x0, cond = batch["x0"].float(), batch["cond"]
        idx = batch["index"].to(self.grid.device)
        t_start, t_end = self.grid[idx], self.grid[idx - o["skip"]]
        w = self._w(batch)
        a, s = self._levels(t_start, x0)
        x_start = a * x0 + s * batch["noise"].to(x0)
        with torch.no_grad(), self.autocast():
            x_end = teacher_solve(o["solver"], self.teacher_fn(cond, w), x_start, t_start, t_end, self.source.schedule,
                                  self.source.prediction_type, o["solver_substeps"], self.solver_scheduler)
            target_net = self.target if self.target is not None else self.raw("student")
            target = self.consistency(target_net, x_end.float(), t_end, cond, w)
        with self.autocast():
            pred = self.consistency(self.net("student"), x_start, t_start, cond, w)
        loss = self.distance(pred, target.detach())
        return loss, {}

    @torch.no_grad()
    def after_update(self, phase: Phase, step: int) -> None:
        if self.target is None:
            return
        mu = self.target_rate()
        for pt, ps in zip(self.target.parameters(), self.raw("student").parameters()):
            pt.lerp_(ps.detach(), 1.0 - mu)
        for bt, bs in zip(self.target.buffers(), self.raw("student").buffers()):
            bt.copy_(bs)

    # ---- sampling and export ---------------------------------------------------------------------
    def scheduler_config(self) -> dict:
        """The :class:`ConsistencyScheduler` config of the student (schedule of the teacher, the
        student's boundary scalings, sampling times on the training grid for 1..8 steps)."""
        sc, o = self.source.scheduler_config, self.opts
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        grid = self.grid.numpy()
        steps = {str(n): sampling_timesteps(grid, n) for n in range(1, min(8, len(grid) - 1) + 1)}
        return {**{k: sc[k] for k in keys if k in sc}, "prediction_type": self.source.prediction_type,
                "boundary": o["boundary"], "sigma_data": o["sigma_data"], "timestep_scaling": o["timestep_scaling"],
                "boundary_timestep": float(grid[0]), "original_inference_steps": o["grid_steps"],
                "step_timesteps": steps}

    def sample(self, model, noise, cond, num_steps, guidance=1.0, generator=None) -> torch.Tensor:
        from fewstep.sample import sample

        scheduler = ConsistencyScheduler(**self.scheduler_config())
        w = torch.full((noise.shape[0],), float(guidance), dtype=torch.float64, device=noise.device)
        emb = self._timestep_cond(w)

        def fn(x, t, c):
            return self.source.call(model, x, t, c, timestep_cond=emb)

        x, _ = sample(fn, noise, scheduler, num_steps, cond=cond, generator=generator)
        return x

    def export(self, model, out_dir: Path, info: dict) -> Path:
        # a guidance range is an input of the exported student only when it has the w-embedding;
        # LCM-LoRA bakes its range into the adapters (recorded, not an input)
        rng = self.guidance_range()
        info = {**info, "guidance_range": rng if self.embedding_dim else None, "trained_guidance_range": rng}
        name = self.cfg["export"]["name"] or self.name.replace("-", "_")
        return self.source.export(name, model, out_dir, self.scheduler_config(), info)


class LCM(ConsistencyDistillation):
    """LCM (see the module docstring)."""

    name = "lcm"
    student_kind = "guidance"
    options = {
        **COMMON,
        "boundary": Option("lcm", "str", "boundary scalings", choices=BOUNDARIES),
        "target_ema": Option(0.95, "float", "target network EMA rate mu", low=0, high=1, high_open=True),
        "guidance_range": Option([1.0, 3.0], "list", "teacher guidance scales w ~ U[low, high] (diffusers "
                                 "convention)", item="float", length=2, low=1, check=_range_check),
        "w_embedding_dim": Option(None, "int", "guidance embedding size (null: 64 digits, 256 pipelines)", low=2,
                                  nullable=True),
    }

    def guidance_range(self):
        return tuple(self.opts["guidance_range"])


class LCMLoRA(ConsistencyDistillation):
    """LCM-LoRA (see the module docstring)."""

    name = "lcm-lora"
    student_kind = "lora"
    options = {
        **COMMON,
        "boundary": Option("lcm", "str", "boundary scalings", choices=BOUNDARIES),
        "guidance_range": Option([1.0, 3.0], "list", "teacher guidance scales w ~ U[low, high], baked into the "
                                 "adapters", item="float", length=2, low=1, check=_range_check),
        "lora_rank": Option(64, "int", "LoRA rank r", low=1),
        "lora_alpha": Option(None, "float", "LoRA alpha (null: = rank)", low=0, low_open=True, nullable=True),
        "lora_targets": Option(list(LCM_LORA_TARGETS), "list", "module name suffixes that get adapters", item="str",
                               check=lambda v: None if v else "must not be empty"),
        "lora_dropout": Option(0.0, "float", "LoRA dropout", low=0, high=1, high_open=True),
    }

    def target_rate(self) -> float:
        return 0.0

    def guidance_range(self):
        return tuple(self.opts["guidance_range"])

    def _w(self, batch):
        return batch["w"].to(self.device)


def _scheduler_class(name: str):
    """A scheduler class by name from :mod:`fewstep.samplers` or diffusers."""
    import diffusers

    import fewstep.samplers as fs

    cls = getattr(fs, name, None) or getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config") or not hasattr(cls, "step"):
        raise ValueError(f"config key 'method.solver_scheduler' = {name!r} is not a scheduler class of "
                         "fewstep.samplers or diffusers (e.g. 'DPMSolverPPScheduler', 'DPMSolverMultistepScheduler')")
    return cls
