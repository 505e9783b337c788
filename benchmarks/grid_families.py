"""The step-grid families of the DPM-Solver-v3 grid search on the digits teacher
(benchmarks/dpm_v3_grid_search.py searches them, benchmarks/dpm_v3_digits.py evaluates the winners):
``logsnr(lo, hi)``, ``power(p)`` and ``karras(smax, rho)``, each snapped to the EMS lambda grid.
Both scripts import this module; neither imports the other's grid code.
"""

from __future__ import annotations

import math

import numpy as np

LAMBDA_T999 = -9.918  # lambda(999) of the teacher's cosine schedule (checked at run time)
LAMBDA_T0 = 5.047  # lambda(0)

FAMILIES = {
    "logsnr": {"lo": [LAMBDA_T999, -6.0, -5.1, -4.0, -3.0, -2.0], "hi": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, LAMBDA_T0]},
    "power": {"p": [0.7, 0.85, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0]},
    "karras": {"log_smax": [9.918, 6.0, round(math.log(80.0), 3), 3.0, 2.0], "rho": [1.0, 2.0, 3.0, 5.0, 7.0, 10.0]},
}


def family_times(schedule, family: str, n: int, **par) -> np.ndarray:
    """Model times (training scale, decreasing, float) of the ``n`` evaluation points of a family
    grid (before snapping); the grid ends at sigma = 0 after them."""
    if family == "logsnr":
        lo = max(par["lo"], float(schedule.lambda_(schedule.t_max)))
        hi = min(par["hi"], float(schedule.lambda_(0.0)))
        return np.asarray(schedule.t_of_lambda(np.linspace(lo, hi, n)), dtype=np.float64)
    if family == "power":  # = (t_max + 1) (1 - i/n)^p - 1
        from fewstep.schedule import make_grid

        return make_grid(schedule, n, "time_power", power=par["p"], round_timesteps=False).timesteps
    if family == "karras":
        from fewstep.schedule import karras_sigmas

        s_min = float(schedule.sigma_ve(0.0))
        s_max = min(math.exp(par["log_smax"]), float(schedule.sigma_ve(schedule.t_max)))
        return np.asarray(schedule.t_of_lambda(-np.log(karras_sigmas(s_min, s_max, n, par["rho"]))), dtype=np.float64)
    raise ValueError(f"unknown family {family!r}")


def snap(ems, schedule, t: np.ndarray) -> np.ndarray:
    """The EMS grid times nearest in lambda to ``t`` (what DPMSolverV3Scheduler does with EMS);
    ``ValueError`` when two points land on the same EMS grid point."""
    idx = ems.index_of(schedule.lambda_(np.asarray(t, dtype=np.float64)))
    if len(np.unique(idx)) != len(idx):
        raise ValueError(f"{len(idx)} points snap to {len(np.unique(idx))} distinct EMS grid points")
    return np.asarray(ems.timesteps[idx], dtype=np.float64)


def grid_fn(ems, schedule, family: str, **par):
    """``n -> snapped model times`` for :func:`dpm_v3_digits.solve`."""
    return lambda n: snap(ems, schedule, family_times(schedule, family, n, **par))
