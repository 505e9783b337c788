"""Noise schedules, step grids and the one prediction conversion of fewstep.

Conventions (used everywhere in fewstep; details in docs/samplers-reference.md):

* Forward process ``x_t = alpha(t) * x_0 + sigma(t) * eps``; half log-SNR
  ``lambda(t) = log(alpha(t) / sigma(t))``, decreasing in ``t``.
* ``t`` is on the model's *training scale*: ``0 .. N - 1`` for discrete VP models, ``0 .. N`` for
  flow matching (``t = N sigma``), ``t = sigma`` for EDM/VE models; the network is called with
  :meth:`NoiseSchedule.model_time` (EDM: ``c_noise = log(sigma) / 4``).
* Everything is computed in float64 (numpy or torch, matching the input) and cast by the caller.

Modules: :mod:`.kinds` (one class per schedule kind), :mod:`.grids` (step grids),
:mod:`.prediction` (raw output <-> ``(x0, eps)``, EDM preconditioning), :mod:`.configs` (reading
diffusers scheduler configs, :func:`noise_schedule_of`).
"""

from ._arrays import check_choice
from .base import KINDS, NoiseSchedule
from .configs import (
    BETA_SCHEDULES,
    FLOW_ONLY_KEYS,
    FLOW_SCHEDULER_CLASSES,
    alphas_cumprod_from_config,
    is_cosine_dpm_config,
    is_edm_config,
    is_flow_matching_config,
    noise_schedule_of,
    schedule_from_config,
    schedule_kind_of_config,
    training_tables,
)
from .grids import (
    GRID_KINDS,
    LAMBDA_SPACINGS,
    Grid,
    beta_sigmas,
    check_num_inference_steps,
    check_power,
    karras_sigmas,
    make_grid,
)
from .kinds import (
    EDM_SIGMA_SCHEDULES,
    SCHEDULE_KINDS,
    DiscreteVPSchedule,
    EDMSchedule,
    FlowMatchingSchedule,
)
from .prediction import EDM_PREDICTION_TYPES, PREDICTION_TYPES, edm_c_noise, edm_preconditioning, from_x0_eps, to_x0_eps

_check_choice = check_choice  # the name fewstep <= 0.1 used

__all__ = [
    "BETA_SCHEDULES",
    "DiscreteVPSchedule",
    "EDMSchedule",
    "EDM_PREDICTION_TYPES",
    "EDM_SIGMA_SCHEDULES",
    "FLOW_ONLY_KEYS",
    "FLOW_SCHEDULER_CLASSES",
    "FlowMatchingSchedule",
    "GRID_KINDS",
    "Grid",
    "KINDS",
    "LAMBDA_SPACINGS",
    "NoiseSchedule",
    "PREDICTION_TYPES",
    "SCHEDULE_KINDS",
    "alphas_cumprod_from_config",
    "beta_sigmas",
    "check_choice",
    "check_num_inference_steps",
    "check_power",
    "edm_c_noise",
    "edm_preconditioning",
    "from_x0_eps",
    "is_cosine_dpm_config",
    "is_edm_config",
    "is_flow_matching_config",
    "karras_sigmas",
    "make_grid",
    "noise_schedule_of",
    "schedule_from_config",
    "schedule_kind_of_config",
    "to_x0_eps",
    "training_tables",
]
