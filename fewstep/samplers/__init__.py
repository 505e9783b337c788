"""Solver math (pure tensor functions) and the diffusers scheduler shells built on it."""

from .dpm_v3 import DPMSolverV3Scheduler
from .dpmpp import DPMSolverPPScheduler
from .ems import EMS, compute_ems
from .momentum import MomentumScheduler
from .scheduler import FewstepScheduler, FewstepSchedulerOutput, threshold_x0

__all__ = [
    "DPMSolverPPScheduler",
    "DPMSolverV3Scheduler",
    "EMS",
    "MomentumScheduler",
    "compute_ems",
    "FewstepScheduler",
    "FewstepSchedulerOutput",
    "threshold_x0",
]
