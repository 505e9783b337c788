"""Noise schedule kinds: one class per kind, each the single source of its ``alpha``, ``sigma``,
``lambda``, their inverses, its time range, model-time map, preconditioning and grid placement.

* :class:`DiscreteVPSchedule` (``kind="discrete"``): DDPM's VP schedule from ``alphas_cumprod``.
* :class:`FlowMatchingSchedule` (``kind="flow"``): rectified flow, ``alpha = 1 - s, sigma = s``.
* :class:`EDMSchedule` (``kind="edm"``): VE with EDM's range and preconditioning (Karras et al. 2022).

``t`` is the training-scale time (docs/samplers-reference.md, "Noise schedule kinds"); everything is
float64 (numpy or torch, matching the input). Code dispatches through these methods, never on ``kind``.
"""

from __future__ import annotations

import math

import numpy as np

from ._arrays import as64, interp, lib
from .base import KINDS, NoiseSchedule
from .grids import LAMBDA_SPACINGS, TIME_POWER, TIME_POWER_ZERO, Grid, check_power, lambda_spaced_times, make_grid
from .prediction import EDM_PREDICTION_TYPES, edm_c_noise, edm_preconditioning


class DiscreteVPSchedule(NoiseSchedule):
    """A VP schedule given by ``alphas_cumprod`` at integer training times ``0 .. N-1`` (DDPM, Ho et
    al. 2020); ``lambda`` is linear in ``t`` between integers (diffusers' log-sigma interpolation).
    ``lambda_min_clipped`` clips the noisy end (``t_max``) as diffusers' DPM-Solver does."""

    KIND = "discrete"
    FIELDS = ("alphas_cumprod", "lambda_min_clipped", "num_train_timesteps")
    integer_times = True
    # diffusers' DDPM-family schedulers (KarrasDiffusionSchedulers without EDMEulerScheduler)
    diffusers_schedulers = (
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
        "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
        "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler",
    )
    spacings = ("linspace", "leading", "trailing", TIME_POWER, TIME_POWER_ZERO) + LAMBDA_SPACINGS

    def __init__(self, alphas_cumprod=None, lambda_min_clipped: float = -math.inf,
                 num_train_timesteps: int | None = None):
        if alphas_cumprod is None:
            raise ValueError("a discrete NoiseSchedule needs alphas_cumprod")
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or len(ac) < 2 or np.any(ac <= 0) or np.any(ac >= 1) or np.any(np.diff(ac) >= 0):
            raise ValueError("alphas_cumprod must be a strictly decreasing 1-D array in (0, 1)")
        if num_train_timesteps not in (None, 1000, len(ac)):
            raise ValueError(f"num_train_timesteps={num_train_timesteps} != len(alphas_cumprod)={len(ac)}")
        self.alphas_cumprod = ac
        self.lambda_min_clipped = lambda_min_clipped
        self.num_train_timesteps = len(ac)
        self._t_grid = np.arange(len(ac), dtype=np.float64)
        self._lam_grid = 0.5 * (np.log(ac) - np.log1p(-ac))
        if math.isnan(lambda_min_clipped) or self.t_max < 1:
            raise ValueError(
                f"lambda_min_clipped={lambda_min_clipped!r} leaves no noise range to sample: it clips the training "
                f"timesteps whose half log-SNR lies below it, and must be at most {self._lam_grid[1]:.3g} (the half "
                "log-SNR at t = 1 of this schedule) or -inf (off); diffusers uses -5.1 for cosine (squaredcos_cap_v2) "
                "schedules"
            )

    def lambda_(self, t):
        """Half log-SNR ``log(alpha/sigma)`` at training-scale time ``t`` (float64)."""
        return interp(t, self._t_grid, self._lam_grid)

    def alpha(self, t):
        """Signal scale ``alpha(t) = 1 / sqrt(1 + e^{-2 lambda})`` (float64)."""
        lam = self.lambda_(t)
        return 1.0 / lib(lam).sqrt(1.0 + lib(lam).exp(-2.0 * lam))

    def sigma(self, t):
        """Noise scale ``sigma(t) = 1 / sqrt(1 + e^{2 lambda})`` (float64)."""
        lam = self.lambda_(t)
        return 1.0 / lib(lam).sqrt(1.0 + lib(lam).exp(2.0 * lam))

    def t_of_lambda(self, lam):
        """Inverse of :meth:`lambda_` (lambda decreases with ``t``: interpolated on the reversed tables)."""
        return interp(lam, self._lam_grid[::-1].copy(), self._t_grid[::-1].copy())

    @property
    def t_max(self) -> float:
        """Largest usable training time (pure noise end; clipped by ``lambda_min_clipped``)."""
        n = self.num_train_timesteps
        if math.isfinite(self.lambda_min_clipped):
            clipped = int(np.searchsorted(self._lam_grid[::-1], self.lambda_min_clipped))
            return float(n - clipped - 1)
        return float(n - 1)

    t_min = 0.0

    def dlogalpha_dlambda(self, alpha, sigma):
        """``sigma^2`` (``alpha^2 + sigma^2 = 1``)."""
        return sigma**2

    @property
    def timestep_limit(self) -> float:
        return float(self.num_train_timesteps - 1)

    @property
    def max_inference_steps(self) -> int:
        return self.num_train_timesteps

    def uniform_times(self, n, spacing, steps_offset, power):
        """diffusers' ``linspace``/``leading``/``trailing`` (Lin et al. 2024, Table 2) and
        ``time_power`` ``t_i = T (1 - i/n)^power - 1`` with ``T = t_max + 1``, ``time_power_zero``
        ``t_i = t_max (1 - i/(n-1))^power`` (both ends evaluated)."""
        last = int(self.t_max) + 1  # diffusers' `last_timestep` after lambda_min_clipped
        if spacing == TIME_POWER_ZERO:
            return float(self.t_max) * (1.0 - np.arange(n) / max(n - 1, 1)) ** power
        if spacing == TIME_POWER:
            t = last * (1.0 - np.arange(n) / n) ** power - 1.0
            if t[-1] < -1e-9:  # (n^power = last gives t = 0 up to rounding)
                raise ValueError(
                    f"num_inference_steps={n} with time_power {power:g} puts the last point at t={t[-1]:.3f} < 0 "
                    f"(needs n^power <= {last}); use fewer steps or a smaller power"
                )
            return np.maximum(t, 0.0)
        if spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + steps_offset
        ratio = self.num_train_timesteps / n  # trailing
        return np.arange(last, 0, -ratio).round() - 1


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow / flow matching (SD3, Flux): ``alpha = 1 - s``, ``sigma = s`` with
    ``s = t / N``. ``shift`` (SD3's time shift, Esser et al. 2024 Eq. 23) acts on step grids, not on
    this map (a shifted grid is still read by the model as ``t = N s``)."""

    KIND = "flow"
    FIELDS = ("num_train_timesteps", "shift")
    dynamic_shift = True
    # the diffusers solvers with use_flow_sigmas/flow_shift; FlowMatch schedulers read `shift`, which a
    # DPM-style config does not carry, so they would sample with shift 1
    diffusers_schedulers = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                            "DEISMultistepScheduler")
    spacings = ("linspace", "leading", "trailing") + LAMBDA_SPACINGS

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, shift_name: str = "shift"):
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = check_power(shift_name, shift)

    def lambda_(self, t):
        """``log((1 - s) / s)`` with ``s = t / N`` (float64)."""
        s = as64(t) / self.num_train_timesteps
        return lib(s).log1p(-s) - lib(s).log(s)

    def alpha(self, t):
        """``1 - t / N`` (float64)."""
        return 1.0 - as64(t) / self.num_train_timesteps

    def sigma(self, t):
        """``t / N`` (float64)."""
        return as64(t) / self.num_train_timesteps

    def t_of_lambda(self, lam):
        """``N / (1 + e^lambda)`` (float64)."""
        lam = as64(lam)
        return self.num_train_timesteps / (1.0 + lib(lam).exp(lam))

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps)

    t_min = 1.0  # sigma = 1/N

    def dlogalpha_dlambda(self, alpha, sigma):
        """``sigma / (alpha + sigma)`` (``alpha = sigmoid(lambda)``)."""
        return sigma / (alpha + sigma)

    def check_prediction_type(self, prediction_type):
        if prediction_type not in ("flow_prediction", "epsilon", "sample"):
            raise ValueError(f"prediction_type={prediction_type!r} is not meaningful with flow sigmas")

    def set_dynamic_shift(self, mu):
        if isinstance(mu, bool) or not isinstance(mu, (int, float, np.floating, np.integer)) or not math.isfinite(mu):
            raise ValueError(f"mu={mu!r} must be a finite number (the dynamic shift is exp(mu))")
        self.shift = float(math.exp(mu))

    def public_sigmas(self, alphas, sigmas):
        return sigmas

    def t_of_public_sigma(self, s):
        return s * self.num_train_timesteps

    def shift_flow_sigma(self, s):
        """SD3's time shift ``shift * s / (1 + (shift - 1) s)`` (Esser et al. 2024, Eq. 23)."""
        return self.shift * s / (1 + (self.shift - 1) * s)

    @property
    def grid_lambda_range(self):
        """The shifted ends of diffusers' ``use_flow_sigmas`` grid, ``shift(1 - 1/N)`` .. ``shift(1/N)``."""
        n_train = self.num_train_timesteps
        s_hi = float(self.shift_flow_sigma(1.0 - 1.0 / n_train))
        s_lo = float(self.shift_flow_sigma(1.0 / n_train))
        return math.log((1 - s_hi) / s_hi), math.log((1 - s_lo) / s_lo)

    def spaced_times(self, n, spacing, *, steps_offset=0, rho=7.0, power=2.0, final_sigma="zero"):
        """Time-uniform spacings: diffusers' ``use_flow_sigmas`` grid with ``shift`` applied; the
        lambda spacings between the same end points. Never exact (model times are ``N s``)."""
        if spacing in LAMBDA_SPACINGS:
            return lambda_spaced_times(self, n, spacing, rho), None, False
        n_train = self.num_train_timesteps
        s = 1.0 - np.linspace(1.0, 1.0 / n_train, n + 1)
        s = np.flip(self.shift_flow_sigma(s))[:-1].copy()
        return s * n_train, None, False

    def training_grid(self, spacing, rho):
        t_all = np.arange(self.num_train_timesteps, dtype=np.float64)[::-1].copy() + 1.0
        return Grid(t_all, self.alpha(t_all), self.sigma(t_all))


EDM_SIGMA_SCHEDULES = ("karras", "exponential")


class EDMSchedule(NoiseSchedule):
    """Variance exploding with EDM's range (Karras et al. 2022): ``alpha = 1``, ``sigma = t`` in
    ``[sigma_min, sigma_max]``. The network is preconditioned (Eq. 7, Table 1): it sees ``c_in x``
    and ``c_noise(sigma) = log(sigma)/4`` (:meth:`model_time`) and outputs ``F``; ``sigma_data`` is
    the data standard deviation of that preconditioning."""

    KIND = "edm"
    FIELDS = ("sigma_min", "sigma_max", "sigma_data", "num_train_timesteps")
    diffusers_schedulers = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
    spacings = ("linspace", "leading", "trailing") + LAMBDA_SPACINGS

    def __init__(self, sigma_min: float | None = 0.002, sigma_max: float | None = 80.0, sigma_data: float = 0.5,
                 num_train_timesteps: int = 1000):
        self.sigma_min = 0.002 if sigma_min is None else float(sigma_min)
        self.sigma_max = 80.0 if sigma_max is None else float(sigma_max)
        if not (math.isfinite(self.sigma_min) and math.isfinite(self.sigma_max)
                and 0 < self.sigma_min < self.sigma_max):
            raise ValueError(
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: an EDM schedule needs finite "
                "0 < sigma_min < sigma_max"
            )
        self.sigma_data = float(sigma_data)
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ValueError(f"sigma_data={self.sigma_data}: an EDM schedule needs a finite sigma_data > 0")
        self.num_train_timesteps = int(num_train_timesteps)

    def lambda_(self, t):
        """``-log(sigma)`` (float64)."""
        t = as64(t)
        return -lib(t).log(t)

    def alpha(self, t):
        """``1`` (float64, shaped like ``t``)."""
        t = as64(t)
        return t * 0 + 1.0

    def sigma(self, t):
        """``t`` (float64)."""
        return as64(t)

    def t_of_lambda(self, lam):
        """``e^{-lambda}`` (float64)."""
        lam = as64(lam)
        return lib(lam).exp(-lam)

    def model_time(self, t):
        """EDM's ``c_noise = log(sigma) / 4`` (Karras et al. 2022, Table 1; float64)."""
        return edm_c_noise(t)

    def t_of_model_time(self, m):
        """``sigma = exp(4 c_noise)`` (float64)."""
        m = as64(m)
        return lib(m).exp(4.0 * m)

    @property
    def t_max(self) -> float:
        return float(self.sigma_max)

    @property
    def t_min(self) -> float:
        return float(self.sigma_min)

    @property
    def init_noise_sigma(self) -> float:
        """``x_T ~ N(0, sigma_max^2 I)`` (Karras et al. 2022, Alg. 1-2; diffusers: ``sqrt(sigma_max^2 + 1)``)."""
        return float(self.sigma_max)

    def dlogalpha_dlambda(self, alpha, sigma):
        """``0`` (``alpha = 1``)."""
        return np.zeros_like(sigma)

    def c_in(self, alpha: float, sigma: float) -> float:
        """The network input scale ``1 / sqrt((sigma/alpha)^2 + sigma_data^2)`` (Table 1)."""
        return float(edm_preconditioning(sigma / alpha, self.sigma_data)[2])

    def check_prediction_type(self, prediction_type):
        if prediction_type not in EDM_PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is not supported with an EDM schedule; allowed: "
                "'epsilon' (EDM's F, Karras et al. 2022 Eq. 7), 'v_prediction'"
            )

    def scheduler_config(self, config, rho):
        """The grid is ``sigma_schedule`` (diffusers' flags do not apply); the resolved EDM values are
        stored so a saved config states them and diffusers' EDM schedulers can load it."""
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas", "use_beta_sigmas"):
            if config.get(flag, False):
                raise ValueError(f"{flag}=True does not apply to an EDM schedule; choose the grid with sigma_schedule")
        return dict(schedule_kind=self.KIND, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                    sigma_data=self.sigma_data, sigma_schedule=self.grid_spacing(config), rho=rho)

    def grid_spacing(self, config):
        """``sigma_schedule`` (``karras``, Eq. 5 with ``rho``, or ``exponential``; default ``karras``)."""
        return config.get("sigma_schedule") or "karras"

    def t_of_public_sigma(self, s):
        return s

    def grid_request(self, model_times):
        """EDM model times are ``c_noise``: the grid is given by ``sigma = exp(4 c_noise)``."""
        return {"sigmas": self.t_of_model_time(np.asarray(model_times, dtype=np.float64))}

    @property
    def grid_lambda_range(self):
        return -math.log(self.sigma_max), -math.log(self.sigma_min)

    def uniform_times(self, n, spacing, steps_offset, power):
        """``n`` sigmas linear from ``sigma_max`` to ``sigma_min``."""
        return np.linspace(self.sigma_max, self.sigma_min, n)

    def training_grid(self, spacing, rho):
        """diffusers' EDM state: the ``sigma_schedule`` grid with ``num_train_timesteps`` points."""
        return make_grid(self, self.num_train_timesteps, spacing, rho=rho)


SCHEDULE_KINDS = tuple(KINDS)
