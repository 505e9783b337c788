"""Deprecated: the scheduler short-name registry moved to :mod:`fewstep.samplers.registry`.

``from fewstep.apps.schedulers import make_scheduler`` (and the other names) still works and
warns; import from ``fewstep.samplers.registry`` instead.
"""

from .._imports import moved_names

_NEW = "fewstep.samplers.registry"
__getattr__ = moved_names(__name__, {
    **{name: f"{_NEW}:{name}" for name in (
        "SchedulerEntry", "registry", "scheduler_names", "get_entry", "make_scheduler", "scheduler_keywords",
        "check_overrides", "parse_overrides", "describe")},
    "parse_value": "fewstep._parse:parse_value",
})
