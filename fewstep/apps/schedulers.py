"""Schedulers by short name, for ``fewstep sample`` and the demo.

Every entry turns a pipeline's scheduler config (``pipe.scheduler.config``: the noise schedule,
``prediction_type``, ``timestep_spacing`` ...) into a ready scheduler with the entry's settings
on top, then the user's overrides (``--scheduler-config key=value``)::

    from fewstep.apps.schedulers import make_scheduler
    pipe.scheduler = make_scheduler("dpmpp-3m-karras", pipe.scheduler.config, {"lower_order_final": False})

Names (``fewstep sample --list-schedulers`` prints this table):

==================== ========== ================================================================
name                 source     what it is
==================== ========== ================================================================
ddim                 fewstep    DDIM (eta = 0) = DPM-Solver++(1); supports CFG++ renoising
euler                diffusers  ``EulerDiscreteScheduler`` (first-order Euler on the sigma ODE)
dpmpp-1m             fewstep    DPM-Solver++(1): same update as ``ddim``
dpmpp-2m             fewstep    DPM-Solver++(2M), multistep order 2 (the guided-sampling default)
dpmpp-3m             fewstep    DPM-Solver++(3M), multistep order 3 (unguided / light guidance)
dpmpp-2m-karras      fewstep    DPM-Solver++(2M) on Karras et al. sigmas (rho = 7)
dpmpp-3m-karras      fewstep    DPM-Solver++(3M) on Karras et al. sigmas
dpmpp-2s             fewstep    singlestep DPM-Solver-fast order 2 (steps = model evaluations)
dpmpp-3s             fewstep    singlestep DPM-Solver-fast order 3 (steps = model evaluations)
dpmpp-2m-sde         fewstep    SDE-DPM-Solver++(2M): stochastic, seeded by the generator
dpmpp-3m-sde         fewstep    SDE-DPM-Solver++(3M)
unipc                diffusers  ``UniPCMultistepScheduler`` (UniPC-bh2 predictor-corrector)
deis                 diffusers  ``DEISMultistepScheduler`` (DEIS log-rho, order 2)
dpmpp-2m-diffusers   diffusers  ``DPMSolverMultistepScheduler``, for comparison with ``dpmpp-2m``
dpm-v3               fewstep    DPM-Solver-v3 (order 2 + corrector) with empirical model statistics
==================== ========== ================================================================

``dpm-v3`` is listed only when :class:`fewstep.samplers.DPMSolverV3Scheduler` is importable. It
needs EMS (``--scheduler-config ems=PATH`` or a shipped name); without one it warns and runs
its degenerate form (= DPM-Solver++). :func:`fewstep.apps.common.load_model` supplies the shipped
digits EMS when present.

Overrides are checked against the scheduler class's keywords: an unknown key is a ``ValueError``
naming the allowed ones (diffusers' ``from_config`` would silently drop it).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class SchedulerEntry:
    """One short name: the class to build (resolved lazily), the entry's fixed keywords and a
    one-line description. ``source`` is ``"fewstep"`` or ``"diffusers"``."""

    name: str
    source: str
    class_path: str
    description: str
    preset: Mapping[str, Any] = field(default_factory=dict)

    def scheduler_class(self):
        module, _, cls = self.class_path.rpartition(".")
        import importlib

        return getattr(importlib.import_module(module), cls)

    def build(self, config: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None):
        """The scheduler for a pipeline whose scheduler config is ``config`` (a diffusers
        ``FrozenDict``/dict, or None for the class defaults) with ``overrides`` on top."""
        cls = self.scheduler_class()
        overrides = dict(overrides or {})
        check_overrides(cls, overrides, self.name)
        kwargs = {**self.preset, **overrides}
        base = dict(config or {})
        return cls.from_config(base, **kwargs)


_FEWSTEP = "fewstep.samplers.DPMSolverPPScheduler"

_ENTRIES: list[SchedulerEntry] = [
    SchedulerEntry("ddim", "fewstep", _FEWSTEP,
                   "DDIM (eta = 0), written as DPM-Solver++(1); supports CFG++ renoising",
                   {"solver_order": 1}),
    SchedulerEntry("euler", "diffusers", "diffusers.EulerDiscreteScheduler",
                   "diffusers EulerDiscreteScheduler (first-order Euler on the sigma ODE)"),
    SchedulerEntry("dpmpp-1m", "fewstep", _FEWSTEP,
                   "DPM-Solver++(1), the same update as ddim", {"solver_order": 1}),
    SchedulerEntry("dpmpp-2m", "fewstep", _FEWSTEP,
                   "DPM-Solver++(2M): multistep order 2, the default for guided sampling",
                   {"solver_order": 2}),
    SchedulerEntry("dpmpp-3m", "fewstep", _FEWSTEP,
                   "DPM-Solver++(3M): multistep order 3, for unguided or lightly guided sampling",
                   {"solver_order": 3}),
    SchedulerEntry("dpmpp-2m-karras", "fewstep", _FEWSTEP,
                   "DPM-Solver++(2M) on Karras et al. (2022) sigmas, rho = 7",
                   {"solver_order": 2, "use_karras_sigmas": True}),
    SchedulerEntry("dpmpp-3m-karras", "fewstep", _FEWSTEP,
                   "DPM-Solver++(3M) on Karras et al. (2022) sigmas, rho = 7",
                   {"solver_order": 3, "use_karras_sigmas": True}),
    SchedulerEntry("dpmpp-2s", "fewstep", _FEWSTEP,
                   "singlestep DPM-Solver-fast, order 2 (steps count model evaluations)",
                   {"solver_order": 2, "method": "singlestep"}),
    SchedulerEntry("dpmpp-3s", "fewstep", _FEWSTEP,
                   "singlestep DPM-Solver-fast, order 3 (steps count model evaluations)",
                   {"solver_order": 3, "method": "singlestep"}),
    SchedulerEntry("dpmpp-2m-sde", "fewstep", _FEWSTEP,
                   "SDE-DPM-Solver++(2M): stochastic, reproducible through the seed",
                   {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}),
    SchedulerEntry("dpmpp-3m-sde", "fewstep", _FEWSTEP,
                   "SDE-DPM-Solver++(3M): stochastic, reproducible through the seed",
                   {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    SchedulerEntry("unipc", "diffusers", "diffusers.UniPCMultistepScheduler",
                   "diffusers UniPCMultistepScheduler (UniPC-bh2 predictor-corrector, order 2)"),
    SchedulerEntry("deis", "diffusers", "diffusers.DEISMultistepScheduler",
                   "diffusers DEISMultistepScheduler (DEIS log-rho, order 2)"),
    SchedulerEntry("dpmpp-2m-diffusers", "diffusers", "diffusers.DPMSolverMultistepScheduler",
                   "diffusers DPMSolverMultistepScheduler (2M), to compare with fewstep's dpmpp-2m",
                   {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
]


def _dpm_v3_entry() -> SchedulerEntry | None:
    try:
        from fewstep.samplers import DPMSolverV3Scheduler  # noqa: F401
    except ImportError:
        return None
    return SchedulerEntry("dpm-v3", "fewstep", "fewstep.samplers.DPMSolverV3Scheduler",
                          "DPM-Solver-v3 (order 2 + corrector) with empirical model statistics "
                          "(--scheduler-config ems=PATH|digits)", {"solver_order": 2})


def registry() -> dict[str, SchedulerEntry]:
    """All available short names -> :class:`SchedulerEntry`, in display order."""
    entries = {e.name: e for e in _ENTRIES}
    v3 = _dpm_v3_entry()
    if v3 is not None:
        entries[v3.name] = v3
    return entries


def scheduler_names() -> list[str]:
    """The available short names, in display order."""
    return list(registry())


def get_entry(name: str) -> SchedulerEntry:
    """The entry for ``name``; ``ValueError`` listing the known names otherwise."""
    entries = registry()
    if name not in entries:
        raise ValueError(f"scheduler {name!r} is unknown; allowed: {', '.join(entries)}")
    return entries[name]


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


def parse_value(text: str) -> Any:
    """A command-line value: JSON (numbers, true/false/null, lists, quoted strings), ``inf``/``-inf``,
    Python-style ``True``/``False``/``None``, otherwise the string itself."""
    s = text.strip()
    low = s.lower()
    if low in ("inf", "+inf", "infinity"):
        return math.inf
    if low in ("-inf", "-infinity"):
        return -math.inf
    if s in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[s]
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def parse_overrides(items: list[str] | str | None) -> dict[str, Any]:
    """``["key=value", ...]`` (or one comma-separated string) -> dict with parsed values.
    ``ValueError`` for an item without ``=`` or with an empty key."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [p for p in _split_top_level(items) if p.strip()]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"scheduler config override {item!r} must look like key=value")
        out[key] = parse_value(value)
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets/quotes (so ``karras_rho=7,timesteps=[999,500]`` works)."""
    parts, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def describe(entries: Mapping[str, SchedulerEntry] | None = None) -> str:
    """A plain-text table of the registry (``--list-schedulers``)."""
    entries = entries or registry()
    width = max(len(n) for n in entries)
    lines = [f"{'name':<{width}}  {'source':<9}  description"]
    for e in entries.values():
        preset = ", ".join(f"{k}={v}" for k, v in e.preset.items())
        cls = e.class_path.rpartition(".")[2]
        lines.append(f"{e.name:<{width}}  {e.source:<9}  {e.description} [{cls}{': ' + preset if preset else ''}]")
    return "\n".join(lines)

