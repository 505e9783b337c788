"""Step grids: :func:`make_grid` places the points a sampler moves through on a noise schedule.

Where the points go on each schedule kind is the kind's business (``NoiseSchedule.spaced_times``);
this module validates requests, handles explicit ``timesteps``/``sigmas``, rounding and the end point.
The spacings are described in docs/samplers-reference.md ("Step grids").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ._arrays import check_choice

if TYPE_CHECKING:  # kinds imports this module
    from .kinds import NoiseSchedule

TIME_POWER = "time_power"
#: ``t_i = t_max (1 - i/(n-1))^power``: both ends evaluated, the last at ``t = 0`` (DPM-Solver-v3's default)
TIME_POWER_ZERO = "time_power_zero"
TIME_POWER_SPACINGS = (TIME_POWER, TIME_POWER_ZERO)
LAMBDA_SPACINGS = ("logsnr", "karras", "exponential", "beta")
#: the Beta distribution of the ``beta`` spacing (Lee et al. 2024; diffusers' ``use_beta_sigmas``)
BETA_SPACING_AB = (0.6, 0.6)
GRID_KINDS = ("linspace", "leading", "trailing") + LAMBDA_SPACINGS + TIME_POWER_SPACINGS


@dataclass
class Grid:
    """A step grid: the model times ``timesteps`` (length ``n``; what the model is called with)
    and the float64 ``alphas``/``sigmas``/``lambdas`` of the ``n + 1`` points the solver moves
    through (the last is the end point, with ``sigma = 0`` when sampling to the data)."""

    timesteps: np.ndarray
    alphas: np.ndarray
    sigmas: np.ndarray

    @property
    def lambdas(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.alphas) - np.log(self.sigmas)

    @property
    def sigmas_ve(self) -> np.ndarray:
        """``sigma/alpha`` per point (diffusers' ``scheduler.sigmas``)."""
        return self.sigmas / self.alphas


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5: ``n`` sigmas from ``sigma_max`` to ``sigma_min`` with ``rho``."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Lee et al. 2024 ("Beta Sampling is All You Need"): ``n`` sigmas from ``sigma_max`` to ``sigma_min``
    at the quantiles ``ppf(1 - i/(n-1))`` of Beta(a, b), denser at both ends (diffusers' ``_convert_to_beta``)."""
    from scipy.stats import beta as beta_distribution

    ppf = beta_distribution.ppf(1.0 - np.linspace(0.0, 1.0, n), a, b)
    return sigma_min + ppf * (sigma_max - sigma_min)


def lambda_spaced_times(schedule: "NoiseSchedule", n: int, spacing: str, rho: float) -> np.ndarray:
    """Times of ``n`` points spaced in lambda over ``schedule.grid_lambda_range``: ``logsnr`` and
    ``exponential`` uniform in lambda, ``karras`` Eq. 5 in ``e^{-lambda} = sigma/alpha`` with ``rho``,
    ``beta`` the Beta(0.6, 0.6) quantiles in ``sigma/alpha`` (:func:`beta_sigmas`)."""
    lam_lo, lam_hi = schedule.grid_lambda_range
    if spacing == "karras":
        lam = -np.log(karras_sigmas(math.exp(-lam_hi), math.exp(-lam_lo), n, rho))
    elif spacing == "beta":
        lam = -np.log(beta_sigmas(math.exp(-lam_hi), math.exp(-lam_lo), n, *BETA_SPACING_AB))
    else:
        lam = np.linspace(lam_lo, lam_hi, n)
    return np.asarray(schedule.t_of_lambda(lam), dtype=np.float64)


def make_grid(
    schedule: "NoiseSchedule",
    num_inference_steps: int | None = None,
    spacing: str = "linspace",
    *,
    steps_offset: int = 0,
    rho: float = 7.0,
    final_sigma: str = "zero",
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    round_timesteps: bool | None = None,
    power: float = 2.0,
) -> Grid:
    """An ``n``-step grid on ``schedule``, from noise to data.

    ``spacing``: ``linspace``/``leading``/``trailing`` (diffusers' time-uniform grids; ``leading``
    adds ``steps_offset``), ``logsnr`` (uniform in lambda), ``karras`` (Karras et al. 2022 Eq. 5 in
    ``sigma/alpha``, exponent ``rho``), ``exponential`` (uniform in ``log(sigma/alpha)``), ``beta``
    (Beta(0.6, 0.6) quantiles in ``sigma/alpha``, Lee et al. 2024), ``time_power``
    (discrete VP: ``t_i = T (1 - i/n)^power - 1``, ``T = t_max + 1``), ``time_power_zero`` (discrete VP:
    ``t_i = t_max (1 - i/(n-1))^power``, both ends evaluated, the last at ``t = 0``, so the final step into
    ``sigma = 0`` starts at the smallest noise level; DPM-Solver-v3's default, docs/dpm-v3.md). Explicit ``timesteps``
    (training scale) or ``sigmas`` (diffusers' public sigmas; a trailing ``0`` is the end point)
    replace the spacing. ``final_sigma``: end at ``sigma = 0`` (``"zero"``) or at the schedule's
    smallest level (``"sigma_min"``). ``round_timesteps`` (default: on discrete schedules) rounds
    model times as diffusers does. Details: docs/samplers-reference.md ("Step grids").
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass only one of `timesteps` and `sigmas`")
    spaced = timesteps is None and sigmas is None
    if spaced:
        if num_inference_steps is None:
            raise ValueError("pass `num_inference_steps`, `timesteps` or `sigmas`")
        check_num_inference_steps(num_inference_steps)
        limit = schedule.max_inference_steps
        if limit is not None and num_inference_steps > limit:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} exceeds the model's "
                f"num_train_timesteps={schedule.num_train_timesteps}"
            )
    check_choice("spacing", spacing, GRID_KINDS)
    check_choice("final_sigma", final_sigma, ("zero", "sigma_min"))
    if spaced and spacing not in schedule.spacings:
        raise ValueError(f"spacing={spacing!r} is not defined for kind={schedule.kind!r} schedules; allowed: "
                         f"{', '.join(map(repr, schedule.spacings))}")
    if spaced and spacing in TIME_POWER_SPACINGS:
        power = check_power("power", power)
    if round_timesteps is None:
        round_timesteps = schedule.integer_times
    n_train = schedule.num_train_timesteps

    exact_t = None  # model times that index the schedule exactly
    t_end = None  # end point of lambda grids with final_sigma="sigma_min"
    if timesteps is not None:
        t = np.asarray(timesteps, dtype=np.float64)
        _check_monotone("timesteps", t)
        if np.any(t < 0) or np.any(t > schedule.timestep_limit):
            raise ValueError(f"timesteps must lie in the training range [0, {n_train}]")
        exact_t = t
    elif sigmas is not None:
        s = np.asarray(sigmas, dtype=np.float64)
        _check_monotone("sigmas", s)
        if np.any(s < 0):
            raise ValueError("sigmas must be >= 0")
        if s[-1] == 0 and len(s) > 1:  # a user grid that already carries its final point
            s, final_sigma = s[:-1], "zero"
        t = schedule.t_of_public_sigma(s)
    else:
        t, t_end, exact = schedule.spaced_times(num_inference_steps, spacing, steps_offset=steps_offset, rho=rho,
                                                power=power, final_sigma=final_sigma)
        if exact:
            exact_t = t

    alphas, sig = schedule.alpha(t), schedule.sigma(t)
    if exact_t is not None and round_timesteps:
        t = np.round(t)
        alphas, sig = schedule.alpha(t), schedule.sigma(t)
    elif round_timesteps:
        t = np.round(t)
    # final point
    if final_sigma == "zero":
        a_end, s_end = 1.0, 0.0
    else:
        t_end = schedule.t_min if t_end is None else t_end
        a_end, s_end = float(schedule.alpha(t_end)), float(schedule.sigma(t_end))
    return Grid(
        timesteps=np.asarray(t, dtype=np.float64),
        alphas=np.append(np.asarray(alphas, dtype=np.float64), a_end),
        sigmas=np.append(np.asarray(sig, dtype=np.float64), s_end),
    )


def check_power(name: str, value) -> float:
    """``value`` as a float when it is a finite number > 0 (the ``time_power`` exponent), else a
    ``ValueError`` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_num_inference_steps(n) -> None:
    """``TypeError``/``ValueError`` naming ``num_inference_steps`` unless it is an int >= 1."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")


def _check_monotone(name: str, x: np.ndarray) -> None:
    if x.ndim != 1 or len(x) < 1:
        raise ValueError(f"{name} must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite")
    if len(x) > 1 and np.any(np.diff(x) >= 0):
        raise ValueError(f"{name} must be strictly decreasing (from noise to data)")
