"""Keeping moved names importable from their old modules, with a ``DeprecationWarning``."""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Mapping


def moved_names(module: str, targets: Mapping[str, str], instead: str | None = None) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``module`` serving the names in ``targets``
    (``{old_name: "package.module:new_name"}``): each access warns with a ``DeprecationWarning``
    naming the replacement (``instead``, default the target) and returns the target object."""

    def __getattr__(name: str):
        target = targets.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, attr = target.partition(":")
        warnings.warn(f"{module}.{name} is deprecated; use {instead or where + '.' + attr}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(where), attr)

    return __getattr__
