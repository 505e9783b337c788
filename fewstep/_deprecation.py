"""Shims for names that moved: the old import path keeps working and warns once per use site."""

from __future__ import annotations

import importlib
import warnings
from typing import Callable


def moved_names(old_module: str, moves: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``old_module`` whose names moved: ``moves`` maps each old
    name to ``"new.module:new_name"``. Reading a moved name imports it from its new home and
    issues a ``DeprecationWarning`` naming both paths."""

    def __getattr__(name: str):
        target = moves.get(name)
        if target is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        warnings.warn(f"{old_module}.{name} moved to {module}.{attr}; import it from there "
                      f"(the old path will be removed)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)

    return __getattr__
