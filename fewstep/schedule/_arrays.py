"""Float64 helpers of the schedule modules: numpy/torch dispatch, interpolation, choice checks."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """``ValueError`` naming ``name``, the value and the allowed values unless ``value in allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def interp(x, xp: np.ndarray, fp: np.ndarray):
    """Piecewise-linear interpolation for numpy arrays, python floats or torch tensors (float64)."""
    if isinstance(x, torch.Tensor):
        return torch.from_numpy(np.interp(x.detach().double().cpu().numpy(), xp, fp)).to(x.device)
    out = np.interp(np.asarray(x, dtype=np.float64), xp, fp)
    return float(out) if np.ndim(out) == 0 else out


def lib(x):
    """``torch`` for tensors, else ``numpy`` (so one formula serves both)."""
    return torch if isinstance(x, torch.Tensor) else np


def as64(x):
    """``x`` as float64 (a tensor stays a tensor, anything else becomes a numpy array)."""
    if isinstance(x, torch.Tensor):
        return x.double()
    return np.asarray(x, dtype=np.float64)
