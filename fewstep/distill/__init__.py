"""Distillation: the shared trainer and the methods built on it.

Public API (imported lazily, so ``import fewstep.distill`` is cheap):

- :class:`Trainer` -- the accelerate training loop (checkpoints, resume, EMA, evaluation, plots).
- :class:`Method`, :class:`Phase`, :func:`register_method`, :data:`METHODS` -- the method interface
  and registry (``cd``, ``lcm``, ``lcm-lora``).
- :class:`ConsistencyScheduler`, :func:`consistency_output`, :func:`boundary_scalings` -- consistency
  functions and multistep consistency sampling.
- :func:`teacher_solve` -- teacher ODE steps between grid points (DDIM / Euler / Heun / any scheduler).
- :func:`list_checkpoints`, :func:`load_weights` -- the checkpoints of a run, one at a time.
- :func:`resolve_config` -- recipe validation.

See docs/distill.md.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": ".trainer",
    "DataOrder": ".trainer",
    "EMA": ".trainer",
    "plot_run": ".trainer",
    "read_log": ".trainer",
    "Method": ".methods",
    "Phase": ".methods",
    "METHODS": ".methods",
    "register_method": ".methods",
    "get_method": ".methods",
    "ConsistencyScheduler": ".consistency",
    "consistency_output": ".consistency",
    "boundary_scalings": ".consistency",
    "training_grid": ".consistency",
    "teacher_solve": ".solvers",
    "list_checkpoints": ".checkpoints",
    "latest_resumable": ".checkpoints",
    "load_weights": ".checkpoints",
    "CheckpointInfo": ".checkpoints",
    "resolve_config": ".config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {name!r} has no attribute {name!r}")
