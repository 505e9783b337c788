"""Reading diffusers scheduler configs: which schedule kind a config describes, the training betas
of its beta keywords, and :func:`noise_schedule_of` (the schedule any scheduler samples on).

See docs/samplers-reference.md ("Noise schedule kinds") for how configs are recognised.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Mapping

import numpy as np
import torch

from ._arrays import check_choice
from .base import NoiseSchedule
from .kinds import DiscreteVPSchedule, EDMSchedule, FlowMatchingSchedule

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FLOW_SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
FLOW_ONLY_KEYS = ("base_image_seq_len", "max_image_seq_len", "invert_sigmas", "shift_terminal")


def is_flow_matching_config(config: Mapping[str, Any]) -> bool:
    """True for a FlowMatch scheduler config (SD3, Flux): by ``_class_name`` when it was loaded
    from disk, by keys only FlowMatch schedulers have when it was built in memory."""
    if config.get("_class_name") in FLOW_SCHEDULER_CLASSES:
        return True
    return "shift" in config and any(k in config for k in FLOW_ONLY_KEYS)


def is_cosine_dpm_config(config: Mapping[str, Any]) -> bool:
    """True for diffusers' ``CosineDPMSolverMultistepScheduler`` config (Stable Audio): by
    ``_class_name``, or for an in-memory config by its keys (EDM's ``sigma_schedule``/``sigma_data``
    with ``solver_order`` but without the ``algorithm_type`` every EDM DPM-Solver config has). Its
    ``c_noise = atan(sigma) / (pi/2)`` is not EDM's, so fewstep refuses it rather than misread it."""
    name = str(config.get("_class_name", ""))
    if name == "CosineDPMSolverMultistepScheduler":
        return True
    if name:
        return False
    return (config.get("sigma_schedule") is not None and config.get("sigma_data") is not None
            and "solver_order" in config and "algorithm_type" not in config and "schedule_kind" not in config)


def is_edm_config(config: Mapping[str, Any]) -> bool:
    """True for an EDM scheduler config (``EDMDPMSolverMultistepScheduler``, ``EDMEulerScheduler``;
    Playground v2.5, CosXL): by ``_class_name`` when it was loaded from disk, by the EDM-only keys
    ``sigma_schedule`` and ``sigma_data`` when it was built in memory (diffusers does not put
    ``_class_name`` into a live scheduler's ``config``), or by an explicit ``schedule_kind``."""
    kind = config.get("schedule_kind")
    if kind is not None:
        return kind == "edm"
    if str(config.get("_class_name", "")).startswith("EDM"):
        return True
    if is_cosine_dpm_config(config):
        return False
    return config.get("sigma_schedule") is not None and config.get("sigma_data") is not None


# ----------------------------------------------------------------------------------------------
# betas of diffusers configs
# ----------------------------------------------------------------------------------------------
def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, Eq. 17), as diffusers' ``squaredcos_cap_v2``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): shift and scale sqrt(alpha_bar) so the last is 0.
    Runs in the dtype of ``betas`` with diffusers' order of operations (float32: bit-identical)."""
    ab_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * (first / (first - last))
    ab = ab_sqrt**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def _check_beta(name: str, value) -> float:
    """``value`` as a float when it is a valid noise variance in (0, 1), else a ``ValueError``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name}={value!r} is not a valid beta (noise variance of one training step): betas must "
                         "lie in (0, 1); Stable Diffusion uses beta_start=0.00085, beta_end=0.012")
    return v


#: diffusers' beta keywords (they define a discrete schedule's training tables) and their defaults
BETA_DEFAULTS: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                 "beta_schedule": "linear", "trained_betas": None, "rescale_betas_zero_snr": False}


def training_tables(config: Mapping[str, Any] | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """diffusers' float32 training tables ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod``
    for the beta keywords (:data:`BETA_DEFAULTS`, read from ``config`` and then ``kwargs``; other keys
    are ignored), computed exactly as diffusers' DDPM-family schedulers do (bit-identical). With
    ``rescale_betas_zero_snr`` the last ``alphas_cumprod`` is set to ``2**-24`` (diffusers PR #7097)
    so that ``sigma/alpha`` stays finite. Bad values raise a ``ValueError`` naming the keyword."""
    c = {k: v for k, v in {**(config or {}), **kwargs}.items() if k in BETA_DEFAULTS}
    num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr = (
        c.get(k, default) for k, default in BETA_DEFAULTS.items())
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
            or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    if trained_betas is not None:
        tb = np.asarray(trained_betas, dtype=np.float64)
        if tb.ndim != 1 or len(tb) < 2 or not np.all((tb > 0) & (tb < 1)):
            raise ValueError("trained_betas must be a 1-D sequence of at least 2 values in (0, 1)")
        betas = torch.tensor(tb, dtype=torch.float32)
    else:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if beta_schedule == "linear":
            betas = torch.linspace(_check_beta("beta_start", beta_start), _check_beta("beta_end", beta_end),
                                   num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            lo, hi = _check_beta("beta_start", beta_start) ** 0.5, _check_beta("beta_end", beta_end) ** 0.5
            betas = torch.linspace(lo, hi, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            betas = torch.tensor(_cosine_betas(num_train_timesteps), dtype=torch.float32)
    if rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    if rescale_betas_zero_snr:
        ac[-1] = 2**-24
    return {"betas": betas, "alphas": alphas, "alphas_cumprod": ac}


def _monotone_terminal(ac: np.ndarray) -> np.ndarray:
    """``alphas_cumprod`` with the entries that fall to or below the forced terminal value ``ac[-1]``
    (diffusers' float32 zero-terminal-SNR table of linear betas: t = 996-998 lie below ``2**-24``)
    replaced by the half log-SNR interpolated linearly from the last entry above it to ``ac[-1]``."""
    low = np.nonzero(ac[:-1] <= ac[-1])[0]
    if len(low) == 0 or low[0] == 0:
        return ac
    k0 = int(low[0]) - 1
    lam = 0.5 * (np.log(ac) - np.log1p(-ac))
    w = (np.arange(k0 + 1, len(ac) - 1) - k0) / (len(ac) - 1 - k0)
    out = ac.copy()
    out[k0 + 1 : -1] = 1.0 / (1.0 + np.exp(-2.0 * (lam[k0] + w * (lam[-1] - lam[k0]))))
    return out


def alphas_cumprod_from_config(config: Mapping[str, Any] | None = None, **kwargs) -> np.ndarray:
    """Cumulative product of ``1 - beta`` (``alpha_bar``, length ``num_train_timesteps``) for the
    diffusers beta keywords (as :func:`training_tables` takes them), as float64: diffusers' float32
    table, so fewstep and diffusers schedulers see bit-identical training schedules. One exception
    keeps the schedule monotone: with ``rescale_betas_zero_snr`` the entries diffusers' float32
    rounding puts below the forced terminal ``2**-24`` (linear betas: t = 996-998) are interpolated
    in half log-SNR."""
    tables = training_tables(config, **kwargs)
    ac = tables["alphas_cumprod"].double().numpy()
    zero_snr = {**(config or {}), **kwargs}.get("rescale_betas_zero_snr", False)
    return _monotone_terminal(ac) if zero_snr else ac


# ----------------------------------------------------------------------------------------------
# config -> schedule
# ----------------------------------------------------------------------------------------------
def schedule_kind_of_config(config: Mapping[str, Any]) -> str:
    """The schedule kind (``"discrete"``, ``"flow"`` or ``"edm"``) a scheduler config describes:
    an explicit ``schedule_kind``; else EDM when :func:`is_edm_config`; else flow matching when
    ``use_flow_sigmas``, ``prediction_type == "flow_prediction"`` or :func:`is_flow_matching_config`;
    else a discrete VP schedule."""
    kind = config.get("schedule_kind")
    if kind is not None:
        return kind
    if is_edm_config(config):
        return EDMSchedule.KIND
    if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction" \
            or is_flow_matching_config(config):
        return FlowMatchingSchedule.KIND
    return DiscreteVPSchedule.KIND


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The schedule a diffusers scheduler config describes (:meth:`NoiseSchedule.from_config`).

    Recognised: the DDPM/DDIM/DPM-Solver beta keywords (``beta_schedule``, ``beta_start``,
    ``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``, ``lambda_min_clipped``); flow
    matching (``flow_shift``, or ``shift`` in FlowMatch configs); EDM (``sigma_min``, ``sigma_max``,
    ``sigma_data``); see :func:`schedule_kind_of_config`."""
    cfg = dict(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    kind = schedule_kind_of_config(cfg)
    if kind == FlowMatchingSchedule.KIND:
        # fewstep/diffusers-DPM configs say `flow_shift`; FlowMatch configs say `shift`
        name = "shift" if is_flow_matching_config(cfg) else "flow_shift"
        shift = cfg.get(name)
        return FlowMatchingSchedule(num_train_timesteps=n, shift=1.0 if shift is None else shift, shift_name=name)
    if kind == EDMSchedule.KIND:
        return EDMSchedule(
            num_train_timesteps=n,
            sigma_min=cfg.get("sigma_min"),
            sigma_max=cfg.get("sigma_max"),
            sigma_data=0.5 if cfg.get("sigma_data") is None else cfg["sigma_data"],
        )
    check_choice("schedule_kind", kind, (DiscreteVPSchedule.KIND, FlowMatchingSchedule.KIND, EDMSchedule.KIND))
    ac = alphas_cumprod_from_config(dict(cfg, num_train_timesteps=n))
    lmc = cfg.get("lambda_min_clipped", -math.inf)
    return DiscreteVPSchedule(alphas_cumprod=ac, lambda_min_clipped=float(lmc))


_SCHEDULES_OF: "weakref.WeakKeyDictionary[Any, tuple[Any, NoiseSchedule]]" = weakref.WeakKeyDictionary()


def noise_schedule_of(scheduler) -> NoiseSchedule:
    """The :class:`NoiseSchedule` a scheduler samples on (its ``alpha``, ``sigma``, model-time map
    and, for EDM, ``sigma_data``).

    A fewstep scheduler's own ``schedule``; for any other diffusers scheduler the schedule its
    ``config`` describes (:func:`schedule_from_config`, with ``_class_name`` taken from the class),
    cached per scheduler until its ``config`` object changes; nothing is written onto the scheduler.
    diffusers' Cosine DPM-Solver (``c_noise = atan(sigma) 2/pi``, not EDM's) is a ``ValueError``."""
    own = getattr(scheduler, "schedule", None)
    if isinstance(own, NoiseSchedule):
        return own
    config = scheduler.config
    try:
        hit = _SCHEDULES_OF.get(scheduler)
    except TypeError:  # not weak-referenceable (e.g. a SimpleNamespace stand-in): no cache
        hit = None
    if hit is not None and hit[0] is config:
        return hit[1]
    cfg = dict(config or {})
    name = type(scheduler).__name__
    if name.startswith("Cosine") or is_cosine_dpm_config(cfg):
        raise ValueError(f"{name} is not supported by fewstep guidance or samplers (its c_noise is not EDM's)")
    cfg.setdefault("_class_name", name)  # live diffusers configs lack it; the class tells EDM and FlowMatch apart
    schedule = schedule_from_config(cfg)
    try:
        _SCHEDULES_OF[scheduler] = (config, schedule)
    except TypeError:
        pass
    return schedule
