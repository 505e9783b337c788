"""Module-level ``__getattr__`` factories: names a package loads on first use, and names that moved
(the old import path keeps working and warns)."""

from __future__ import annotations

import importlib
import warnings
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A ``__getattr__`` for ``package`` that imports each exported name from its submodule
    (``exports`` maps the name to ``".submodule"``) on first use and caches it, so importing the
    package stays cheap (no torch for the CLI's start-up)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(package)
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(module, name, value)
        return value

    return __getattr__


def moved_names(old_module: str, moves: dict[str, str],
                instead: dict[str, str] | None = None) -> Callable[[str], object]:
    """A ``__getattr__`` for ``old_module`` whose names moved: ``moves`` maps each old name to
    ``"new.module:new_name"``. Reading a moved name imports it from its new home and issues a
    ``DeprecationWarning`` naming both paths, or, for names in ``instead``, the replacement given
    there (an old-signature function kept for old callers names the new API, not its shim)."""

    def __getattr__(name: str):
        target = moves.get(name)
        if target is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        if instead and name in instead:
            message = f"{old_module}.{name} is deprecated; use {instead[name]}"
        else:
            message = f"{old_module}.{name} moved to {module}.{attr}; import it from there"
        warnings.warn(f"{message} (the old path will be removed)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)

    return __getattr__


def load_callable(spec: str, what: str = "module:callable") -> Callable:
    """``"package.module:name"`` -> the callable it names. Errors say which part is wrong: a module
    that is not importable (``ModuleNotFoundError`` inside it is re-raised as is when the module
    exists but imports something missing), an attribute the module lacks, or a non-callable."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name != err.name and not module_name.startswith(err.name + "."):
            raise  # the module exists but one of its own imports is missing: show that
        raise ValueError(f"{what} {spec!r}: no module named {module_name!r} (is it installed, or on PYTHONPATH?)") \
            from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what} {spec!r}: {attr!r} is not callable")
    return target
