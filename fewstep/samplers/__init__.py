"""Solver math (pure tensor functions) and the diffusers scheduler shells built on it."""

from .dpmpp import DPMSolverPPScheduler
from .scheduler import FewstepScheduler, FewstepSchedulerOutput, threshold_x0

__all__ = ["DPMSolverPPScheduler", "FewstepScheduler", "FewstepSchedulerOutput", "threshold_x0"]
