"""Schedulers by short name, shared by Python users, ``fewstep sample`` and the demo.

Every entry turns a pipeline's scheduler config (``pipe.scheduler.config``: the noise schedule,
``prediction_type``, ``timestep_spacing`` ...) into a ready scheduler with the entry's preset on
top, then the caller's overrides (``--scheduler-config key=value``)::

    from fewstep.samplers.registry import make_scheduler
    pipe.scheduler = make_scheduler("dpmpp-3m-karras", pipe.scheduler.config, {"lower_order_final": False})

``fewstep sample --list-schedulers`` prints the table (:func:`describe`).

Adding a short name is one entry in :data:`SCHEDULERS` (or one :func:`register_scheduler` call
from outside the package)::

    SchedulerEntry("hb-dpmpp", "fewstep.samplers.MomentumScheduler",
                   "DPM-Solver++(2M) with heavy-ball momentum (Wizadwongsa et al., ICLR 2024)",
                   {"method": "hb", "base": "dpmpp", "beta": 0.8})

* ``name``: lower-case, words joined by ``-``; variants of one solver share a prefix
  (``dpmpp-2m``, ``dpmpp-2m-karras``), diffusers' own classes used for comparison end in
  ``-diffusers`` when fewstep has the same solver.
* ``class_path``: the class by import path. It is imported only when the scheduler is built, so
  listing and validating names imports neither torch nor diffusers (the CLI checks names first).
  Any diffusers-compatible scheduler class works (``from_config`` + the scheduler contract).
* ``description``: one line, what the variant is and when to use it.
* ``preset``: the keywords that make this variant (order, spacing, momentum ...). They must be
  keywords of the class; a test builds every entry.

Model-specific keywords do not go into an entry: the model supplies them (``fewstep sample``'s
loader gives ``dpm-v3`` the shipped digits EMS; a distilled student's loader would give its
sampler the student's fixed timesteps), and the caller's overrides win over both. A distilled
student's own sampler (e.g. a consistency multistep sampler) is an entry like any other.

Overrides are checked against the scheduler class's keywords: an unknown key is a ``ValueError``
naming the allowed ones (diffusers' ``from_config`` would silently drop it).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

from .._parse import parse_value, split_top_level

__all__ = [
    "SCHEDULERS",
    "SchedulerEntry",
    "check_overrides",
    "describe",
    "get_entry",
    "make_scheduler",
    "parse_overrides",
    "register_scheduler",
    "registry",
    "scheduler_keywords",
    "scheduler_names",
]


@dataclass(frozen=True)
class SchedulerEntry:
    """One short name: the class to build (by import path, resolved when built), a one-line
    description and the preset keywords of this variant."""

    name: str
    class_path: str
    description: str
    preset: Mapping[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """``"fewstep"`` or ``"diffusers"`` (the top-level package of the class)."""
        return self.class_path.partition(".")[0]

    @property
    def class_name(self) -> str:
        return self.class_path.rpartition(".")[2]

    def scheduler_class(self):
        module, _, cls = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), cls)

    def build(self, config: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None):
        """The scheduler for a pipeline whose scheduler config is ``config`` (a diffusers
        ``FrozenDict``/dict, or None for the class defaults) with ``overrides`` on top."""
        cls = self.scheduler_class()
        overrides = dict(overrides or {})
        check_overrides(cls, overrides, self.name)
        return cls.from_config(dict(config or {}), **{**self.preset, **overrides})


_PP = "fewstep.samplers.DPMSolverPPScheduler"
_MOM = "fewstep.samplers.MomentumScheduler"

#: The built-in short names, in display order.
SCHEDULERS: tuple[SchedulerEntry, ...] = (
    SchedulerEntry("ddim", _PP, "DDIM (eta = 0), written as DPM-Solver++(1); supports CFG++ renoising",
                   {"solver_order": 1}),
    SchedulerEntry("euler", "diffusers.EulerDiscreteScheduler",
                   "diffusers EulerDiscreteScheduler (first-order Euler on the sigma ODE)"),
    SchedulerEntry("dpmpp-1m", _PP, "DPM-Solver++(1), the same update as ddim", {"solver_order": 1}),
    SchedulerEntry("dpmpp-2m", _PP, "DPM-Solver++(2M): multistep order 2, the default for guided sampling",
                   {"solver_order": 2}),
    SchedulerEntry("dpmpp-3m", _PP, "DPM-Solver++(3M): multistep order 3, for unguided or lightly guided sampling",
                   {"solver_order": 3}),
    SchedulerEntry("dpmpp-2m-karras", _PP, "DPM-Solver++(2M) on Karras et al. (2022) sigmas, rho = 7",
                   {"solver_order": 2, "use_karras_sigmas": True}),
    SchedulerEntry("dpmpp-3m-karras", _PP, "DPM-Solver++(3M) on Karras et al. (2022) sigmas, rho = 7",
                   {"solver_order": 3, "use_karras_sigmas": True}),
    SchedulerEntry("dpmpp-2s", _PP, "singlestep DPM-Solver-fast, order 2 (steps count model evaluations)",
                   {"solver_order": 2, "method": "singlestep"}),
    SchedulerEntry("dpmpp-3s", _PP, "singlestep DPM-Solver-fast, order 3 (steps count model evaluations)",
                   {"solver_order": 3, "method": "singlestep"}),
    SchedulerEntry("dpmpp-2m-sde", _PP, "SDE-DPM-Solver++(2M): stochastic, reproducible through the seed",
                   {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}),
    SchedulerEntry("dpmpp-3m-sde", _PP, "SDE-DPM-Solver++(3M): stochastic, reproducible through the seed",
                   {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    SchedulerEntry("unipc", "diffusers.UniPCMultistepScheduler",
                   "diffusers UniPCMultistepScheduler (UniPC-bh2 predictor-corrector, order 2)"),
    SchedulerEntry("deis", "diffusers.DEISMultistepScheduler",
                   "diffusers DEISMultistepScheduler (DEIS log-rho, order 2)"),
    SchedulerEntry("dpmpp-2m-diffusers", "diffusers.DPMSolverMultistepScheduler",
                   "diffusers DPMSolverMultistepScheduler (2M), to compare with fewstep's dpmpp-2m",
                   {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    # momentum presets set all four momentum keywords, so a previous momentum config cannot leak in
    SchedulerEntry("ghvb", _MOM, "generalized heavy-ball momentum, GHVB 2.5 (order 3, beta 0.5) for high CFG "
                   "(override momentum_number=..., e.g. 3.8)",
                   {"method": "ghvb", "base": "plms", "momentum_number": 2.5, "beta": None}),
    SchedulerEntry("hb-dpmpp", _MOM, "DPM-Solver++(2M) with heavy-ball momentum, beta 0.8 (official ADM setting)",
                   {"method": "hb", "base": "dpmpp", "momentum_number": None, "beta": 0.8}),
    SchedulerEntry("hb-plms4", _MOM, "PLMS4 with heavy-ball momentum, beta 0.8 (override beta=...)",
                   {"method": "hb", "base": "plms", "momentum_number": 4, "beta": 0.8}),
    SchedulerEntry("ghvb-ab-karras", _MOM, "GHVB 3.5 on variable-step Adams-Bashforth weights and Karras sigmas "
                   "(SD-like schedules at high CFG)",
                   {"method": "ghvb", "base": "ab", "momentum_number": 3.5, "beta": None, "use_karras_sigmas": True}),
    SchedulerEntry("consistency", "fewstep.distill.consistency.ConsistencyScheduler",
                   "multistep consistency sampler of distilled students (digits-cd, digits-lcm): 1-N steps, "
                   "one evaluation each"),
    SchedulerEntry("dpm-v3", "fewstep.samplers.DPMSolverV3Scheduler",
                   "DPM-Solver-v3 (order 2 + corrector) with empirical model statistics "
                   "(--scheduler-config ems=PATH|digits)", {"solver_order": 2}),
)

_REGISTRY: dict[str, SchedulerEntry] = {e.name: e for e in SCHEDULERS}


def register_scheduler(entry: SchedulerEntry, replace: bool = False) -> SchedulerEntry:
    """Add ``entry`` to the registry (for short names defined outside fewstep); ``ValueError``
    when the name is taken (unless ``replace``) or is not a lower-case ``word-word`` name."""
    if not isinstance(entry, SchedulerEntry):
        raise TypeError(f"entry must be a SchedulerEntry, got {type(entry).__name__}")
    name = entry.name
    if not name or name != name.strip().lower() or any(ch.isspace() or ch in ",|:=" for ch in name):
        raise ValueError(f"scheduler name {name!r} must be lower-case, without spaces or any of ',|:='")
    if name in _REGISTRY and not replace:
        raise ValueError(f"scheduler name {name!r} is already registered ({_REGISTRY[name].class_path})")
    _REGISTRY[name] = entry
    return entry


def registry() -> dict[str, SchedulerEntry]:
    """All short names -> :class:`SchedulerEntry`, in display order (a copy)."""
    return dict(_REGISTRY)


def scheduler_names() -> list[str]:
    """The short names, in display order."""
    return list(_REGISTRY)


def get_entry(name: str) -> SchedulerEntry:
    """The entry for ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"scheduler {name!r} is unknown; allowed: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make_scheduler(name: str, config: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None):
    """Build the scheduler ``name`` from a pipeline's scheduler ``config`` plus ``overrides``."""
    return get_entry(name).build(config, overrides)


def scheduler_keywords(cls) -> set[str]:
    """Keyword arguments ``cls`` accepts through ``from_config`` (its ``__init__`` parameters)."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_overrides(cls, overrides: Mapping[str, Any], name: str = "") -> None:
    """``ValueError`` for override keys that ``cls`` does not take."""
    allowed = scheduler_keywords(cls)
    bad = sorted(k for k in overrides if k not in allowed)
    if bad:
        label = f"scheduler {name!r} ({cls.__name__})" if name else cls.__name__
        raise ValueError(f"--scheduler-config key(s) {bad} not accepted by {label}; "
                         f"allowed: {', '.join(sorted(allowed))}")


def parse_overrides(items: list[str] | str | None) -> dict[str, Any]:
    """``["key=value", ...]`` (or one comma-separated string) -> dict with parsed values.
    ``ValueError`` for an item without ``=`` or with an empty key."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [p for p in split_top_level(items) if p.strip()]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"scheduler config override {item!r} must look like key=value")
        out[key] = parse_value(value)
    return out


def describe(entries: Mapping[str, SchedulerEntry] | None = None) -> str:
    """A plain-text table of the registry (``--list-schedulers``)."""
    entries = entries or registry()
    width = max(len(n) for n in entries)
    lines = [f"{'name':<{width}}  {'source':<9}  description"]
    for e in entries.values():
        preset = ", ".join(f"{k}={v}" for k, v in e.preset.items())
        cls = e.class_name + (": " + preset if preset else "")
        lines.append(f"{e.name:<{width}}  {e.source:<9}  {e.description} [{cls}]")
    return "\n".join(lines)
