"""The configuration keywords every fewstep scheduler shares, declared once, and their checks.

**Rule for a new scheduler** (a :class:`~fewstep.samplers.FewstepScheduler` subclass): its
``@register_to_config __init__`` lists every key of :data:`COMMON_CONFIG` with exactly the default
given there (diffusers' ``ConfigMixin`` reads the signature, so it must stay explicit), followed by
its own keywords. A scheduler that supports EDM/VE models also lists every key of :data:`EDM_CONFIG`
(all or none). Keys of :data:`OPTIONAL_CONFIG` are declared by the schedulers they apply to, with the
table's default. A default may differ from the tables only when the class names the key in
``_config_overrides`` (e.g. DPM-Solver-v3's ``round_timesteps=None``: "decided by whether EMS are
loaded"). ``tests/test_config_table.py`` checks every subclass mechanically, as diffusers checks its
"Copied from" copies. The base class reads these keys through ``self.config`` (or
:func:`config_value` for the optional ones) and never restates a default.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

from ..schedule import EDM_SIGMA_SCHEDULES, GRID_KINDS, PREDICTION_TYPES, SCHEDULE_KINDS, check_choice, check_power

#: keywords every FewstepScheduler declares, with their defaults (diffusers' where it has the keyword)
COMMON_CONFIG: dict[str, Any] = {
    # the training noise schedule (diffusers' beta keywords; flow matching)
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "lambda_min_clipped": -math.inf,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    # what the model outputs and what is done with it
    "prediction_type": "epsilon",
    "variance_type": None,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "check_finite": True,
    # the solver
    "lower_order_final": True,
    # the step grid
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "karras_rho": 7.0,
    "timestep_power": 2.0,
    "final_sigmas_type": "zero",
    "round_timesteps": True,
}

#: keywords of schedulers that run EDM/VE models (``schedule_kind="edm"``; Karras et al. 2022)
EDM_CONFIG: dict[str, Any] = {
    "schedule_kind": None,
    "sigma_min": None,
    "sigma_max": None,
    "sigma_data": 0.5,
    "sigma_schedule": None,
    "rho": None,
}

#: keywords of the schedulers they apply to (DPM-Solver orders), with their defaults
OPTIONAL_CONFIG: dict[str, Any] = {
    "solver_order": 2,
    "euler_at_final": False,
}

# DDPMScheduler's variance types; DPM-Solver uses none of them, it only strips learned variance channels
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")

#: values other diffusers schedulers write that DPM-Solver++ reads as its own, as diffusers'
#: ``DPMSolverMultistepScheduler.__init__`` maps them when a pipeline switches schedulers: UniPC's
#: ``bh1``/``bh2`` and DEIS' ``logrho`` solver types, DEIS' ``deis`` algorithm
SWITCHED_VALUES: dict[str, dict[str, str]] = {
    "solver_type": {"bh1": "midpoint", "bh2": "midpoint", "logrho": "midpoint"},
    "algorithm_type": {"deis": "dpmsolver++"},
}


def switched_values(config: Mapping[str, Any]) -> dict[str, str]:
    """The entries of ``config`` that :data:`SWITCHED_VALUES` maps, with their mapped values."""
    return {key: table[config[key]] for key, table in SWITCHED_VALUES.items() if config.get(key) in table}


def config_value(config: Mapping[str, Any], key: str):
    """``config[key]`` for a table key; for an :data:`EDM_CONFIG` or :data:`OPTIONAL_CONFIG` key a
    scheduler does not declare, the table default."""
    if key in config or key in COMMON_CONFIG:
        return config[key]
    return EDM_CONFIG[key] if key in EDM_CONFIG else OPTIONAL_CONFIG[key]


def karras_rho(config: Mapping[str, Any]) -> float:
    """The Karras exponent: EDM's ``rho`` when set, else ``karras_rho``."""
    rho = config_value(config, "rho")
    return float(config["karras_rho"] if rho is None else rho)


def check_config(c: Mapping[str, Any]) -> None:
    """Validate the table keys of a scheduler config; ``ValueError`` naming the key and value."""
    order = config_value(c, "solver_order")
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"solver_order={order!r} is not supported; allowed: 1, 2, 3")
    check_power("karras_rho", c["karras_rho"])
    if c["thresholding"]:
        check_thresholding(c["sample_max_value"], c["dynamic_thresholding_ratio"])
    check_power("timestep_power", c["timestep_power"])
    check_choice("prediction_type", c["prediction_type"], PREDICTION_TYPES)
    check_choice("final_sigmas_type", c["final_sigmas_type"], ("zero", "sigma_min"))
    flags = [c["use_karras_sigmas"], c["use_exponential_sigmas"], c["use_lu_lambdas"], c["use_beta_sigmas"]]
    if sum(bool(f) for f in flags) > 1:
        raise ValueError("use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas and use_beta_sigmas are exclusive")
    check_choice("timestep_spacing", c["timestep_spacing"], GRID_KINDS)
    check_choice("variance_type", c["variance_type"], VARIANCE_TYPES)
    kind = config_value(c, "schedule_kind")
    check_choice("schedule_kind", kind, (None,) + SCHEDULE_KINDS)
    if config_value(c, "sigma_schedule") is not None:
        check_choice("sigma_schedule", c["sigma_schedule"], EDM_SIGMA_SCHEDULES)
    rho = config_value(c, "rho")
    if rho is not None and not float(rho) > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if c["use_flow_sigmas"] and kind not in (None, "flow"):
        raise ValueError(f"use_flow_sigmas=True contradicts schedule_kind={kind!r}")


def check_thresholding(sample_max_value, ratio) -> None:
    """``ValueError`` naming the key unless dynamic thresholding (Saharia et al. 2022) is well defined:
    the per-sample scale ``s`` is clamped to ``[1, sample_max_value]`` (so ``sample_max_value >= 1``,
    ``inf`` allowed) and is the ``ratio`` quantile of ``|x0|`` (so ``0 < ratio <= 1``)."""
    try:
        v, r = float(sample_max_value), float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"sample_max_value={sample_max_value!r} and dynamic_thresholding_ratio={ratio!r} must be "
                         "numbers") from None
    if not v >= 1.0:
        raise ValueError(f"sample_max_value={sample_max_value!r}: dynamic thresholding scales x0 by s in "
                         "[1, sample_max_value], so it must be >= 1 (1.0 for pixels in [-1, 1]; DeepFloyd IF: 1.5)")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio={ratio!r} is the quantile of |x0| used as the scale and must "
                         "lie in (0, 1] (Imagen: 0.995)")


def signature_mismatches(cls) -> list[str]:
    """How ``cls.__init__``'s keywords disagree with :data:`COMMON_CONFIG`/:data:`EDM_CONFIG` (the
    rule in the module docstring); empty when they agree."""
    params = inspect.signature(cls.__init__).parameters
    overrides = getattr(cls, "_config_overrides", {})
    problems = []
    edm = [k for k in EDM_CONFIG if k in params]
    if edm and len(edm) != len(EDM_CONFIG):
        problems.append(f"{cls.__name__}.__init__ declares {edm} but not all of EDM_CONFIG {list(EDM_CONFIG)}")
    optional = {k: v for k, v in OPTIONAL_CONFIG.items() if k in params}
    table = {**COMMON_CONFIG, **{k: EDM_CONFIG[k] for k in edm}, **optional}
    for key, default in table.items():
        want = overrides.get(key, default)
        if key not in params:
            problems.append(f"{cls.__name__}.__init__ lacks the common keyword {key!r}")
        elif not _same_default(params[key].default, want):
            problems.append(f"{cls.__name__}.__init__: {key}={params[key].default!r}, expected {want!r}")
    problems += [f"{cls.__name__}._config_overrides names {key!r}, not a table keyword"
                 for key in overrides if key not in table]
    return problems


def _same_default(a, b) -> bool:
    return type(a) is type(b) and a == b or (a is None and b is None)
