"""Solver math (pure tensor functions) and the diffusers scheduler shells built on it.

The names below are imported on first use, so that ``fewstep.samplers.registry`` (scheduler short
names, read by the ``fewstep`` CLI before it validates arguments) loads without torch or diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "COMMON_CONFIG": ".config",
    "EDM_CONFIG": ".config",
    "OPTIONAL_CONFIG": ".config",
    "DPMSolverPPScheduler": ".dpmpp",
    "DPMSolverV3Scheduler": ".dpm_v3",
    "EMS": ".ems",
    "MomentumScheduler": ".momentum",
    "compute_ems": ".ems_estimate",
    "FewstepScheduler": ".scheduler",
    "FewstepSchedulerOutput": ".scheduler",
    "noise_schedule_of": "..schedule",
    "threshold_x0": ".scheduler",
}

__all__ = [
    "COMMON_CONFIG",
    "EDM_CONFIG",
    "OPTIONAL_CONFIG",
    "DPMSolverPPScheduler",
    "DPMSolverV3Scheduler",
    "EMS",
    "MomentumScheduler",
    "compute_ems",
    "FewstepScheduler",
    "FewstepSchedulerOutput",
    "noise_schedule_of",
    "threshold_x0",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
