"""Distillation methods and their registry (``fewstep distill METHOD``)."""

from __future__ import annotations

from .base import Method, Phase
from .consistency import LCM, ConsistencyDistillation, LCMLoRA
from .distribution import DisBack, FDistill

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a :class:`Method` subclass to :data:`METHODS` under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method needs a Method subclass, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a ``ValueError`` listing the methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not supported; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


for _cls in (ConsistencyDistillation, LCM, LCMLoRA, FDistill, DisBack):
    register_method(_cls)

__all__ = ["METHODS", "Method", "Phase", "register_method", "get_method", "ConsistencyDistillation", "LCM", "LCMLoRA",
           "FDistill", "DisBack"]
