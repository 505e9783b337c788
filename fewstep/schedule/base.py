"""``NoiseSchedule``: the interface every noise schedule kind implements (see :mod:`.kinds`).

The base holds what is the same for all kinds, written in terms of the kind's own maps; a kind
class overrides what differs (docs/samplers-reference.md, "Noise schedule kinds").
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from ._arrays import as64, check_choice, lib
from .grids import LAMBDA_SPACINGS, TIME_POWER_ZERO, Grid, lambda_spaced_times
from .prediction import PREDICTION_TYPES

#: kind name -> class, filled as the kind classes are defined (:mod:`.kinds`)
KINDS: dict[str, type] = {}

# the dataclass fields of fewstep <= 0.1's NoiseSchedule, in order, with their defaults
_LEGACY_FIELDS = {"alphas_cumprod": None, "num_train_timesteps": 1000, "shift": 1.0, "sigma_min": None,
                  "sigma_max": None, "sigma_data": 0.5, "lambda_min_clipped": -math.inf}


class _KindDispatch(type):
    """``NoiseSchedule(kind=..., **fields)`` (the constructor of fewstep <= 0.1) builds that kind's class."""

    def __call__(cls, *args, **kwargs):
        if cls is not NoiseSchedule:
            return super().__call__(*args, **kwargs)
        names = ("kind",) + tuple(_LEGACY_FIELDS)
        if len(args) > len(names):
            raise TypeError(f"NoiseSchedule takes at most {len(names)} positional arguments")
        kwargs.update(zip(names, args))
        kind = kwargs.pop("kind", "discrete")
        check_choice("kind", kind, tuple(KINDS))
        target = KINDS[kind]
        own = {k: v for k, v in kwargs.items() if k in target.FIELDS}
        for k, v in kwargs.items():
            if k not in target.FIELDS and not (k in _LEGACY_FIELDS and _same(v, _LEGACY_FIELDS[k])):
                raise ValueError(f"{k}={v!r} does not apply to a {kind!r} schedule")
        return target(**own)


def _same(a, b) -> bool:
    return a is b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b)


class NoiseSchedule(metaclass=_KindDispatch):
    """``alpha(t)``, ``sigma(t)``, ``lambda(t) = log(alpha/sigma)`` and ``t(lambda)`` of one schedule kind.

    Build with :meth:`from_config` (any diffusers scheduler config) or a kind's class;
    ``NoiseSchedule(kind="discrete", alphas_cumprod=...)`` still works. ``kind`` is a read-only name
    for messages and serialisation. ``sigma_data`` is EDM's data std (preconditioned networks), else None.
    """

    KIND = ""
    FIELDS: tuple[str, ...] = ()
    # attributes every kind answers (values of the kinds that do not use them)
    alphas_cumprod = None
    sigma_min = None
    sigma_max = None
    sigma_data: float | None = None
    shift = 1.0
    lambda_min_clipped = -math.inf
    num_train_timesteps = 1000
    #: model times are integers on the training scale (diffusers rounds them)
    integer_times = False
    #: the step-grid spacings this kind places (see :func:`fewstep.schedule.make_grid`)
    spacings: tuple[str, ...] = ()
    #: initial noise scale of ``x_T`` (``scheduler.init_noise_sigma``)
    init_noise_sigma = 1.0
    #: the kind takes diffusers' dynamic shifting ``mu`` (:meth:`set_dynamic_shift`)
    dynamic_shift = False
    #: diffusers scheduler classes that read a scheduler config of this kind as the same model
    #: (``scheduler.compatibles``; a class missing a keyword of the kind would change the model)
    diffusers_schedulers: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``"discrete"``, ``"flow"`` or ``"edm"`` (read-only)."""
        return self.KIND

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """The schedule a diffusers scheduler config describes (see :func:`fewstep.schedule.schedule_from_config`)."""
        from .configs import schedule_from_config  # configs builds the kinds defined here

        return schedule_from_config(config)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            KINDS[cls.KIND] = cls

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS if k != "alphas_cumprod")
        return f"{type(self).__name__}({fields})"

    # ---- the maps (float64; subclasses define lambda_, alpha, sigma, t_of_lambda) --------------
    def sigma_ve(self, t):
        """``sigma/alpha = exp(-lambda)``: the VE-style sigma diffusers stores in ``sigmas``."""
        return lib(as64(t)).exp(-self.lambda_(t))

    def model_time(self, t):
        """The time value the network is called with at schedule time ``t`` (what diffusers stores
        in ``scheduler.timesteps``); ``t`` itself except for EDM (float64)."""
        return as64(t)

    def t_of_model_time(self, m):
        """Inverse of :meth:`model_time` (float64)."""
        return as64(m)

    @property
    def lambda_range(self) -> tuple[float, float]:
        """``(lambda(t_max), lambda(t_min))``: the half log-SNR interval of the usable range."""
        return float(self.lambda_(self.t_max)), float(self.lambda_(self.t_min))

    def dlogalpha_dlambda(self, alpha, sigma):
        """``d log(alpha) / d lambda`` at ``(alpha, sigma)`` (the drift of ``x`` along the ODE)."""
        raise NotImplementedError

    # ---- the scheduler contract -----------------------------------------------------------------
    def check_prediction_type(self, prediction_type: str) -> None:
        """``ValueError`` when a model of this kind cannot predict ``prediction_type``."""
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)

    def scheduler_config(self, config: Mapping[str, Any], rho: float) -> dict:
        """Check a scheduler config against this kind; the resolved entries to store in it."""
        return {}

    def grid_spacing(self, config: Mapping[str, Any]) -> str:
        """The step-grid spacing a scheduler config asks for (diffusers' boolean flags mapped)."""
        if config.get("use_karras_sigmas"):
            return "karras"
        if config.get("use_lu_lambdas"):
            return "logsnr"
        if config.get("use_exponential_sigmas"):
            return "exponential"
        if config.get("use_beta_sigmas"):
            return "beta"
        return config["timestep_spacing"]

    def set_dynamic_shift(self, mu: float) -> None:
        """diffusers' dynamic shifting ``shift = exp(mu)`` (flow matching only)."""
        raise ValueError("`mu` (dynamic shifting) only applies to flow-matching schedules")

    def public_sigmas(self, alphas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
        """diffusers' ``scheduler.sigmas`` of grid points: ``sigma/alpha`` (flow: ``sigma``)."""
        return sigmas / alphas

    def t_of_public_sigma(self, s: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`public_sigmas`: the times of explicit ``sigmas=`` grids."""
        with np.errstate(divide="ignore"):
            return self.t_of_lambda(-np.log(s))

    def grid_request(self, model_times) -> dict:
        """:func:`make_grid` keywords for explicit model times (``set_timesteps(timesteps=...)``)."""
        return {"timesteps": model_times}

    # ---- step grids -------------------------------------------------------------------------------
    @property
    def timestep_limit(self) -> float:
        """Largest explicit ``timesteps`` value :func:`make_grid` accepts."""
        return float(self.num_train_timesteps)

    max_inference_steps: int | None = None

    @property
    def grid_lambda_range(self) -> tuple[float, float]:
        """``(lambda_lo, lambda_hi)`` spanned by the lambda-spaced grids (logsnr, karras, exponential)."""
        return self.lambda_range

    def uniform_times(self, n: int, spacing: str, steps_offset: int, power: float) -> np.ndarray:
        """``n`` decreasing times of a time-uniform spacing (linspace, leading, trailing, time_power)."""
        raise NotImplementedError

    def spaced_times(self, n: int, spacing: str, *, steps_offset: int = 0, rho: float = 7.0, power: float = 2.0,
                     final_sigma: str = "zero") -> tuple[np.ndarray, float | None, bool]:
        """``(times, t_end, exact)`` of an ``n``-step grid: with ``final_sigma="sigma_min"`` the
        lambda-spaced grids place ``n + 1`` points and the last is the end point ``t_end``; ``exact``:
        the times are where the model is evaluated (time-uniform grids), so rounding re-reads the levels."""
        if spacing in LAMBDA_SPACINGS:
            if final_sigma == "sigma_min":
                t_all = lambda_spaced_times(self, n + 1, spacing, rho)
                return t_all[:-1], float(t_all[-1]), False
            return lambda_spaced_times(self, n, spacing, rho), None, False
        if spacing == TIME_POWER_ZERO and final_sigma == "sigma_min":  # its last point is already t = 0
            t_all = self.uniform_times(n + 1, spacing, steps_offset, power)
            return t_all[:-1], float(t_all[-1]), True
        return self.uniform_times(n, spacing, steps_offset, power), None, True

    def training_grid(self, spacing: str, rho: float) -> Grid:
        """The grid of every training time, the scheduler state before ``set_timesteps`` (as diffusers)."""
        t_all = np.arange(self.num_train_timesteps, dtype=np.float64)[::-1].copy()
        return Grid(t_all, self.alpha(t_all), self.sigma(t_all))
