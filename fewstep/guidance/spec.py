"""Guidance by text: ``"cfg:2.0"``, ``"apg:scale=5,eta=0"``, ``"cfgpp:0.6"`` -> a guidance object.

The spec language of ``fewstep sample --guidance`` and the demo, for Python users too::

    from fewstep.guidance import parse_guidance
    g = parse_guidance("apg:scale=3,momentum=-0.5").build()   # a fresh APG(scale=3.0, momentum=-0.5)

Syntax: ``method[:value][,key=value...]``; a bare first value sets the method's first parameter
(its scale; ``rescale``'s ``phi``). ``none`` (or an empty spec) is no guidance. Values are
numbers, ``true``/``false`` or, for ``space``, one of ``x0, eps, v, output``. Scale conventions are
the guidance classes' (``cfg:w`` is diffusers' ``guidance_scale = w``; ``cfgpp:lambda`` is CFG++'s
lambda in [0, 1]).

Parsing and the checks of names, keys and types import neither torch nor the guidance classes
(the CLI validates ``--guidance`` before it loads anything); :meth:`GuidanceSpec.build` imports
the class, whose constructor checks the value ranges. A method is one :class:`GuidanceMethod` in
:data:`GUIDANCE_METHODS`; ``tests/test_guidance_spec.py`` checks every entry's parameters against
its class's signature.
"""

from __future__ import annotations

import importlib
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, Mapping

from .._parse import parse_value

__all__ = [
    "GUIDANCE_METHODS",
    "GuidanceMethod",
    "GuidanceSpec",
    "Param",
    "describe_guidance",
    "guidance_names",
    "guidance_parameters",
    "parse_guidance",
]

SPACE_CHOICES = ("x0", "eps", "v", "output")


@dataclass(frozen=True)
class Param:
    """One keyword of a guidance method: ``kind`` is ``"number"``, ``"int"``, ``"bool"`` or
    ``"space"``; ``default`` is what the method uses when the spec omits it (None: required)."""

    name: str
    kind: str
    default: Any
    help: str


@dataclass(frozen=True)
class GuidanceMethod:
    """A short name: the class (by import path; None for ``none``), a one-line description, its
    scalar parameters (the first one is what a bare value sets), the defaults the spec puts in
    even when omitted (``cfg``'s scale 2.0 instead of the class's 7.5) and an example setting
    that gives good digits."""

    name: str
    class_path: str | None
    description: str
    params: tuple[Param, ...] = ()
    spec_defaults: Mapping[str, Any] = field(default_factory=dict)
    example: str = ""

    def param(self, key: str) -> Param | None:
        return next((p for p in self.params if p.name == key), None)

    def guidance_class(self):
        if self.class_path is None:
            return None
        module, _, cls = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), cls)


_SPACE_HELP = "where the rule acts: x0, eps, v or output (the raw model output)"
_M = "fewstep.guidance.methods."

GUIDANCE_METHODS: dict[str, GuidanceMethod] = {m.name: m for m in (
    GuidanceMethod("none", None, "no guidance: the conditional model alone (one evaluation per step)"),
    GuidanceMethod(
        "cfg", _M + "CFG", "classifier-free guidance, uncond + w (cond - uncond) (Ho & Salimans 2022)",
        (Param("scale", "number", 2.0, "w, diffusers' guidance_scale (1: no guidance, >= 0)"),),
        spec_defaults={"scale": 2.0}, example="scale=2.0"),
    GuidanceMethod(
        "apg", _M + "APG", "adaptive projected guidance: CFG's update without its part parallel to cond, in x0 "
        "(Sadat et al. 2025); less saturation at high w",
        (Param("scale", "number", 7.5, "w (>= 0), as cfg"),
         Param("eta", "number", 0.0, "weight of the parallel part (1 with no threshold or momentum: cfg)"),
         Param("norm_threshold", "number", 0.0, "r: clip the update's norm to r (0: off)"),
         Param("momentum", "number", 0.0, "beta of the running update (paper: -0.5; 0: off)"),
         Param("space", "space", "x0", _SPACE_HELP)),
        example="scale=3,eta=0"),
    GuidanceMethod(
        "cfgpp", _M + "CFGPlusPlus", "CFG++: the guided x0, renoised with the unconditional noise (Chung et al. "
        "2025); needs ddim, dpmpp-* or dpm-v3",
        (Param("scale", "number", 0.6, "lambda in [0, 1] (about cfg w = 1 + 11.5 lambda)"),),
        example="scale=0.6"),
    GuidanceMethod(
        "ag", _M + "AdaptiveGuidance", "adaptive guidance: cfg until cond and uncond agree, then conditional-only "
        "steps (Castillo et al. 2025); saves evaluations",
        (Param("scale", "number", 7.5, "w of the inner cfg"),
         Param("threshold", "number", 0.99, "stop guiding a sample once cos(cond, uncond) >= this"),
         Param("space", "space", "x0", "where the cosine is measured: x0, eps, v or output"),
         Param("per_sample", "bool", True, "decide per sample (false: the whole batch at once)"),
         Param("min_step", "int", 0, "never switch before this step index")),
        example="scale=2,threshold=0.99"),
    GuidanceMethod(
        "rescale", _M + "GuidanceRescale", "cfg with guidance rescale toward the conditional output's std "
        "(Lin et al. 2024)",
        (Param("phi", "number", 0.7, "rescale strength in [0, 1] (0: plain cfg)"),
         Param("scale", "number", None, "w of the inner cfg (required)"),
         Param("space", "space", "output", _SPACE_HELP)),
        example="phi=0.7,scale=3"),
)}

ALIASES = {"cfg++": "cfgpp", "adaptive": "ag", "off": "none"}


def guidance_names() -> list[str]:
    """The method short names, in display order (``none`` first)."""
    return list(GUIDANCE_METHODS)


def guidance_parameters(method: str) -> dict[str, Any]:
    """Scalar parameters of ``method`` and the values it uses when a spec omits them (None: required)."""
    return {p.name: p.default for p in _method(method).params}


def _method(name: str, label: str = "guidance") -> GuidanceMethod:
    m = GUIDANCE_METHODS.get(ALIASES.get(name, name))
    if m is None:
        raise ValueError(f"{label}: unknown method {name!r}; allowed: {', '.join(GUIDANCE_METHODS)}")
    return m


@dataclass
class GuidanceSpec:
    """A parsed spec: ``method`` (short name) and its keyword ``params``. :meth:`build` makes a
    fresh guidance object per generation (state such as APG momentum never leaks between runs)."""

    method: str
    params: dict[str, Any]
    #: how the spec is called in error messages (``"--guidance"`` on the command line)
    name: str = field(default="guidance", compare=False, repr=False)

    @property
    def text(self) -> str:
        """The canonical spec (``cfg:scale=2.0``)."""
        if self.method == "none":
            return "none"
        return self.method + (":" + ",".join(f"{k}={v}" for k, v in self.params.items()) if self.params else "")

    @property
    def is_plain(self) -> bool:
        """True for ``none`` and ``cfg`` (what a pipeline's own ``guidance_scale`` can run)."""
        return self.method in ("none", "cfg")

    @property
    def scale(self) -> float:
        """The plain CFG scale: 1.0 for ``none``, the ``scale`` parameter when given, else 2.0 (what a
        pipeline's own ``guidance_scale`` is set to; the guidance object carries its real scale)."""
        if self.method == "none":
            return 1.0
        return float(self.params.get("scale", 2.0))

    def build(self):
        """A new :class:`fewstep.guidance.Guidance` (``None`` for ``none``); ``ValueError`` naming
        the spec when the class refuses a value."""
        cls = GUIDANCE_METHODS[self.method].guidance_class()
        if cls is None:
            return None
        try:
            return cls(**self.params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.name} {self.text!r}: {err}") from None


def _convert(p: Param, raw: str, label: str):
    val = parse_value(raw)
    if p.kind == "bool":
        if not isinstance(val, bool):
            raise ValueError(f"{label}: {p.name} must be true or false, got {raw.strip()!r}")
        return val
    if p.kind == "space":
        if val not in SPACE_CHOICES:
            raise ValueError(f"{label}: {p.name} must be one of {', '.join(SPACE_CHOICES)}, got {raw.strip()!r}")
        return val
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
        raise ValueError(f"{label}: {p.name} must be a finite number, got {raw.strip()!r}")
    if p.kind == "int":
        if not float(val).is_integer():
            raise ValueError(f"{label}: {p.name} must be an integer, got {raw.strip()!r}")
        return int(val)
    return float(val)


def parse_guidance(spec: str | None, name: str = "guidance", validate: bool = True) -> GuidanceSpec:
    """Parse ``method[:value][,key=value...]`` (see the module docstring). ``None``/``""`` mean
    ``none``. ``ValueError`` naming the bad part and what is allowed; ``name`` is how the
    argument is called in messages (``"--guidance"`` on the command line). ``validate`` also
    builds the object once, so its class checks the value ranges (this imports torch)."""
    if spec is None or not str(spec).strip():
        return GuidanceSpec("none", {})
    text = str(spec).strip()
    label = f"{name} {text!r}"
    method_name, _, rest = text.partition(":")
    method = _method(method_name.strip().lower(), label)
    params: dict[str, Any] = {}
    for i, item in enumerate(p for p in rest.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        if not sep:
            if i != 0 or not method.params:
                raise ValueError(f"{label}: {item!r} must be key=value (only the first value may be bare)")
            key, value = method.params[0].name, item
        key = key.strip()
        p = method.param(key)
        if p is None:
            allowed = ", ".join(q.name for q in method.params) or "(none)"
            raise ValueError(f"{label}: parameter {key!r} is not accepted by {method.name}; allowed: {allowed}")
        params[key] = _convert(p, value, label)
    if method.name == "none" and params:
        raise ValueError(f"{label}: 'none' takes no parameters")
    for key, value in method.spec_defaults.items():
        params.setdefault(key, value)
    missing = [p.name for p in method.params if p.default is None and p.name not in params]
    if missing:
        raise ValueError(f"{label}: {method.name} needs {', '.join(missing)} (e.g. {method.name}:{method.example})")
    out = GuidanceSpec(method.name, params, name)
    if method.name == "cfg" and out.scale < 0:
        raise ValueError(f"{label}: cfg scale must be >= 0, got {out.scale}")
    if validate:
        out.build()
    return out


def _show(value) -> str:
    if value is None:
        return "?"
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe_guidance() -> str:
    """A plain-text table of the methods, their parameters and defaults (``--list-guidance``)."""
    width = max(len(n) for n in GUIDANCE_METHODS)
    lines = []
    for m in GUIDANCE_METHODS.values():
        lines += textwrap.wrap(m.description, 100, initial_indent=f"{m.name:<{width}}  ",
                               subsequent_indent=" " * (width + 2))
        settings = [f"{p.name}={_show(p.default)}" for p in m.params]
        pw = max(map(len, settings), default=0)
        for setting, p in zip(settings, m.params):
            lines.append(f"{'':<{width}}    {setting:<{pw}}  {p.help}")
        if m.example:
            lines.append(f"{'':<{width}}    e.g. --guidance {m.name}:{m.example}")
    return "\n".join(lines)
