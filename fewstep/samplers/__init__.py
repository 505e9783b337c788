"""Solver math (pure tensor functions) and the diffusers scheduler shells built on it."""

from ..schedule import noise_schedule_of
from .config import COMMON_CONFIG, EDM_CONFIG, OPTIONAL_CONFIG
from .dpm_v3 import DPMSolverV3Scheduler
from .dpmpp import DPMSolverPPScheduler
from .ems import EMS
from .ems_estimate import compute_ems
from .scheduler import FewstepScheduler, FewstepSchedulerOutput, threshold_x0

__all__ = [
    "COMMON_CONFIG",
    "EDM_CONFIG",
    "OPTIONAL_CONFIG",
    "DPMSolverPPScheduler",
    "DPMSolverV3Scheduler",
    "EMS",
    "compute_ems",
    "FewstepScheduler",
    "FewstepSchedulerOutput",
    "noise_schedule_of",
    "threshold_x0",
]
