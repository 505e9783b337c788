"""The method interface of the shared distillation trainer.

A method is a small class that says *what* is trained; :class:`fewstep.distill.trainer.Trainer`
does everything else once (accelerate, data order, micro-batches, optimizers, LR schedules, EMA,
checkpoints, resume, evaluation, logging, plots, export). A method declares:

* ``name`` and ``options`` -- its config keys (:class:`fewstep.distill.config.Option`), validated
  with the recipe; ``check(cfg)`` for cross-key checks (runs before anything is loaded);
* :meth:`build` -- creates its models from the source (the teacher is ``self.source.teacher``) and
  returns the **trainable** ones by name; each gets an AdamW with the ``train`` settings, scaled by
  :meth:`lr_scale`. ``ema_model`` names the one that gets an EMA, is evaluated and exported;
* :meth:`state_modules` -- other modules whose weights must be checkpointed (a target network);
* :meth:`phases` -- the updates of one iteration (for a two-time-scale update: several phases,
  e.g. ``[Phase("fake_score", "fake_score", repeat=5), Phase("generator", "generator")]``); every
  repeat of a phase draws a fresh global batch and steps the phase's optimizer once;
* :meth:`draw` -- the per-sample randomness of a phase for the *global* batch (noise, times,
  guidance scales...), drawn from the trainer's generator so that the losses are the same however
  the batch is split over processes and accumulation steps;
* :meth:`loss` -- the loss of one micro-batch (``batch`` holds ``x0`` when the phase needs data,
  ``cond``, and this micro-batch's rows of what :meth:`draw` returned);
* :meth:`after_update` -- e.g. the target-network EMA after the student's step;
* :meth:`sample` -- how the student generates (for evaluation), and :meth:`export`.

In :meth:`loss`, call the model being trained through ``self.net(name)`` (the accelerate/DDP
wrapper) and every other model through ``self.raw(name)`` under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import Option


@dataclass(frozen=True)
class Phase:
    """One update of an iteration: ``model`` is the trainable model whose optimizer steps, ``repeat``
    how many times per iteration, ``needs_data`` whether the batch carries training data ``x0``."""

    name: str
    model: str
    repeat: int = 1
    needs_data: bool = True


class Method:
    """Base class of distillation methods; see the module docstring."""

    name: ClassVar[str] = "method"
    options: ClassVar[dict[str, Option]] = {}
    ema_model: ClassVar[str] = "student"
    needs_data: ClassVar[bool] = True

    def __init__(self, cfg: dict, source, accelerator):
        self.cfg = cfg
        self.opts = cfg["method"]
        self.source = source
        self.accelerator = accelerator
        self.device = accelerator.device
        self._raw: dict[str, torch.nn.Module] = {}
        self._wrapped: dict[str, torch.nn.Module] = {}

    # -- declared by methods ---------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: dict) -> None:
        """Cross-key checks of a resolved config (raise ``ValueError`` naming the keys)."""

    def build(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def state_modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def lr_scale(self, model: str) -> float:
        return 1.0

    def phases(self, step: int) -> list[Phase]:
        return [Phase("student", self.ema_model)]

    def draw(self, phase: Phase, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, phase: Phase, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_update(self, phase: Phase, step: int) -> None:
        pass

    def sample(self, model: torch.nn.Module, noise: torch.Tensor, cond: dict, num_steps: int,
               guidance: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def export(self, model: torch.nn.Module, out_dir: Path, info: dict) -> Path:
        raise NotImplementedError

    # -- used by methods -------------------------------------------------------------------------
    def bind(self, raw: dict[str, torch.nn.Module], wrapped: dict[str, torch.nn.Module]) -> None:
        """Called by the trainer after ``accelerator.prepare``."""
        self._raw, self._wrapped = dict(raw), dict(wrapped)

    def net(self, name: str) -> torch.nn.Module:
        """The trainable model ``name`` as prepared by accelerate (DDP wrapper in multi-process runs)."""
        return self._wrapped[name]

    def raw(self, name: str) -> torch.nn.Module:
        """The unwrapped model ``name``."""
        return self._raw[name]

    def autocast(self):
        """The accelerate autocast context (mixed precision) for forward passes of frozen models."""
        return self.accelerator.autocast()
