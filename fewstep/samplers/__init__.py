"""Solver math (pure tensor functions) and the diffusers scheduler shells built on it.

The names below are imported on first use, so that ``fewstep.samplers.registry`` (scheduler short
names, read by the ``fewstep`` CLI before it validates arguments) loads without torch or diffusers.
"""

from __future__ import annotations

from .._imports import lazy_exports

_EXPORTS = {
    "DPMSolverPPScheduler": ".dpmpp",
    "DPMSolverV3Scheduler": ".dpm_v3",
    "EMS": ".ems",
    "compute_ems": ".ems",
    "FewstepScheduler": ".scheduler",
    "FewstepSchedulerOutput": ".scheduler",
    "threshold_x0": ".scheduler",
}

__all__ = [
    "DPMSolverPPScheduler",
    "DPMSolverV3Scheduler",
    "EMS",
    "compute_ems",
    "FewstepScheduler",
    "FewstepSchedulerOutput",
    "threshold_x0",
]

__getattr__ = lazy_exports(__name__, _EXPORTS)
