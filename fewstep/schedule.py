"""Noise schedules, step grids and the one prediction conversion of fewstep.

Conventions (used everywhere in fewstep):

* Forward process ``x_t = alpha(t) * x_0 + sigma(t) * eps``.
* Half log-SNR ``lambda(t) = log(alpha(t) / sigma(t))``; it decreases as ``t`` grows.
* ``t`` is on the model's *training scale*: ``0 .. num_train_timesteps - 1`` for discrete VP
  models (the values diffusers passes to a UNet), ``0 .. num_train_timesteps`` for flow matching
  (``t = 1000 * sigma`` as in SD3), and ``t = sigma`` for EDM/VE models. What the network itself
  is called with is :meth:`NoiseSchedule.model_time`: ``t`` for VP and flow models, EDM's
  ``c_noise(sigma) = log(sigma) / 4`` for EDM models (Karras et al. 2022, Table 1).
* EDM models are *preconditioned* (Karras et al. 2022, Eq. 7 and Table 1): the network ``F`` sees
  ``c_in x`` and ``c_noise``, and the denoiser is ``D(x) = c_skip x + c_out F``;
  :func:`edm_preconditioning` gives the coefficients, :func:`to_x0_eps` / :func:`from_x0_eps`
  with ``sigma_data=...`` convert ``F``.
* diffusers stores VP schedules as the VE-style ``sigma_ve = sigma / alpha = exp(-lambda)``;
  :meth:`NoiseSchedule.sigma_ve` returns it for the schedulers' public ``sigmas`` attribute.

Everything is computed in float64 (numpy or torch, matching the input) and cast by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
GRID_KINDS = ("linspace", "leading", "trailing", "logsnr", "karras", "exponential", "time_power", "time_power_zero")
SCHEDULE_KINDS = ("discrete", "flow", "edm")
EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
EDM_SIGMA_SCHEDULES = ("karras", "exponential")

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


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


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
    Runs in the dtype of ``betas`` (float32 for parity with diffusers)."""
    ab_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * first / (first - last)
    ab = ab_sqrt**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_config(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """Cumulative product of ``1 - beta`` (``alpha_bar``, length ``num_train_timesteps``) for the
    diffusers beta keywords. Computed in float32 first, exactly as diffusers does, so fewstep and
    diffusers schedulers see bit-identical training schedules; returned as float64.

    With ``rescale_betas_zero_snr`` the last entry is set to ``2**-24`` (diffusers PR #7097) so
    that ``sigma/alpha`` stays finite.
    """
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
    else:
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            betas = torch.tensor(_cosine_betas(num_train_timesteps), dtype=torch.float32)
    if rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    ac = torch.cumprod(1.0 - betas, dim=0)
    if rescale_betas_zero_snr:
        ac[-1] = 2**-24
    return ac.double().numpy()


# ----------------------------------------------------------------------------------------------
# NoiseSchedule
# ----------------------------------------------------------------------------------------------
def _interp(x, xp: np.ndarray, fp: np.ndarray):
    """Piecewise-linear interpolation for numpy arrays, python floats or torch tensors (float64)."""
    if isinstance(x, torch.Tensor):
        return torch.from_numpy(np.interp(x.detach().double().cpu().numpy(), xp, fp)).to(x.device)
    out = np.interp(np.asarray(x, dtype=np.float64), xp, fp)
    return float(out) if np.ndim(out) == 0 else out


def _lib(x):
    return torch if isinstance(x, torch.Tensor) else np


def _as64(x):
    if isinstance(x, torch.Tensor):
        return x.double()
    return np.asarray(x, dtype=np.float64)


@dataclass
class NoiseSchedule:
    """The single source of truth for ``alpha(t)``, ``sigma(t)``, ``lambda(t)`` and ``t(lambda)``.

    Kinds (see the module docstring for units of ``t``):

    * ``"discrete"``: a VP schedule given by ``alphas_cumprod`` at integer training timesteps
      (DDPM, Ho et al. 2020). Between integers, ``lambda`` is interpolated linearly in ``t``,
      which is the same as diffusers' log-sigma interpolation (``_sigma_to_t``) and DPM-Solver's
      ``NoiseScheduleVP('discrete')`` up to its ``t = (i + 1) / N`` offset.
    * ``"flow"``: rectified flow / flow matching (SD3, Flux): ``alpha = 1 - s``, ``sigma = s``
      with ``s = t / num_train_timesteps``. The ``shift`` of SD3 acts on step grids, not on
      this map (a shifted grid is still read by the model as ``t = 1000 * s``).
    * ``"edm"``: variance exploding with EDM's range (Karras et al. 2022): ``alpha = 1``,
      ``sigma = t`` in ``[sigma_min, sigma_max]``; ``sigma_data`` is the data standard deviation
      of the model's preconditioning (Table 1), and the network is called with
      ``c_noise(sigma)`` (:meth:`model_time`).

    Use :meth:`from_config` to build one from any diffusers scheduler config.
    """

    kind: str = "discrete"
    alphas_cumprod: np.ndarray | None = None
    num_train_timesteps: int = 1000
    shift: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    sigma_data: float = 0.5
    lambda_min_clipped: float = -math.inf

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, SCHEDULE_KINDS)
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.kind == "discrete":
            if self.alphas_cumprod is None:
                raise ValueError("a discrete NoiseSchedule needs alphas_cumprod")
            ac = np.asarray(self.alphas_cumprod, dtype=np.float64)
            if ac.ndim != 1 or len(ac) < 2 or np.any(ac <= 0) or np.any(ac >= 1) or np.any(np.diff(ac) >= 0):
                raise ValueError("alphas_cumprod must be a strictly decreasing 1-D array in (0, 1)")
            self.alphas_cumprod = ac
            self.num_train_timesteps = len(ac)
            self._t_grid = np.arange(len(ac), dtype=np.float64)
            self._lam_grid = 0.5 * (np.log(ac) - np.log1p(-ac))
        elif self.kind == "edm":
            self.sigma_min = 0.002 if self.sigma_min is None else float(self.sigma_min)
            self.sigma_max = 80.0 if self.sigma_max is None else float(self.sigma_max)
            if not (math.isfinite(self.sigma_min) and math.isfinite(self.sigma_max)
                    and 0 < self.sigma_min < self.sigma_max):
                raise ValueError(
                    f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: an EDM schedule needs finite "
                    "0 < sigma_min < sigma_max"
                )
            self.sigma_data = float(self.sigma_data)
            if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
                raise ValueError(f"sigma_data={self.sigma_data}: an EDM schedule needs a finite sigma_data > 0")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build the schedule a diffusers scheduler config describes.

        Recognised: the DDPM/DDIM/DPM-Solver beta keywords (``beta_schedule``, ``beta_start``,
        ``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``, ``lambda_min_clipped``);
        flow matching when ``use_flow_sigmas`` is true, ``prediction_type == "flow_prediction"``
        or ``_class_name`` is a FlowMatch scheduler (``flow_shift`` or ``shift``); EDM (keys
        ``sigma_min``, ``sigma_max``, ``sigma_data``) when :func:`is_edm_config`.
        """
        cfg = dict(config)
        n = int(cfg.get("num_train_timesteps", 1000))
        kind = cfg.get("schedule_kind")
        if kind is None:
            if is_edm_config(cfg):
                kind = "edm"
            elif (
                cfg.get("use_flow_sigmas")
                or cfg.get("prediction_type") == "flow_prediction"
                or is_flow_matching_config(cfg)
            ):
                kind = "flow"
            else:
                kind = "discrete"
        if kind == "flow":
            # fewstep/diffusers-DPM configs say `flow_shift`; FlowMatch configs say `shift`
            shift = cfg.get("shift") if is_flow_matching_config(cfg) else cfg.get("flow_shift")
            return cls(kind="flow", num_train_timesteps=n, shift=float(shift or 1.0))
        if kind == "edm":
            return cls(
                kind="edm",
                num_train_timesteps=n,
                sigma_min=cfg.get("sigma_min"),
                sigma_max=cfg.get("sigma_max"),
                sigma_data=0.5 if cfg.get("sigma_data") is None else cfg["sigma_data"],
            )
        ac = alphas_cumprod_from_config(
            num_train_timesteps=n,
            beta_start=float(cfg.get("beta_start", 0.0001)),
            beta_end=float(cfg.get("beta_end", 0.02)),
            beta_schedule=cfg.get("beta_schedule", "linear"),
            trained_betas=cfg.get("trained_betas"),
            rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
        )
        lmc = cfg.get("lambda_min_clipped", -math.inf)
        return cls(kind="discrete", alphas_cumprod=ac, lambda_min_clipped=float(lmc))

    # ---- the four maps -------------------------------------------------------------------------
    def lambda_(self, t):
        """Half log-SNR ``log(alpha/sigma)`` at training-scale time ``t`` (float64)."""
        if self.kind == "discrete":
            return _interp(t, self._t_grid, self._lam_grid)
        t = _as64(t)
        lib = _lib(t)
        if self.kind == "flow":
            s = t / self.num_train_timesteps
            return lib.log1p(-s) - lib.log(s)
        return -lib.log(t)

    def alpha(self, t):
        """Signal scale ``alpha(t)`` (float64)."""
        if self.kind == "flow":
            return 1.0 - _as64(t) / self.num_train_timesteps
        if self.kind == "edm":
            t = _as64(t)
            return t * 0 + 1.0
        lam = self.lambda_(t)
        return 1.0 / _lib(lam).sqrt(1.0 + _lib(lam).exp(-2.0 * lam))

    def sigma(self, t):
        """Noise scale ``sigma(t)`` (float64)."""
        if self.kind == "flow":
            return _as64(t) / self.num_train_timesteps
        if self.kind == "edm":
            return _as64(t)
        lam = self.lambda_(t)
        return 1.0 / _lib(lam).sqrt(1.0 + _lib(lam).exp(2.0 * lam))

    def sigma_ve(self, t):
        """``sigma/alpha = exp(-lambda)``: the VE-style sigma diffusers stores in ``sigmas``."""
        return _lib(_as64(t)).exp(-self.lambda_(t))

    def t_of_lambda(self, lam):
        """Inverse of :meth:`lambda_`: the training-scale time with half log-SNR ``lam``."""
        if self.kind == "discrete":
            # lambda decreases with t: interpolate on the reversed (increasing) arrays
            return _interp(lam, self._lam_grid[::-1].copy(), self._t_grid[::-1].copy())
        lam = _as64(lam)
        lib = _lib(lam)
        if self.kind == "flow":
            return self.num_train_timesteps / (1.0 + lib.exp(lam))
        return lib.exp(-lam)

    def model_time(self, t):
        """The time value the network is called with at schedule time ``t`` (what diffusers
        stores in ``scheduler.timesteps``): ``t`` itself for VP and flow schedules; for EDM the
        noise conditioning ``c_noise = log(sigma) / 4`` of Karras et al. 2022, Table 1 (float64)."""
        if self.kind != "edm":
            return _as64(t)
        return edm_c_noise(t)

    def t_of_model_time(self, m):
        """Inverse of :meth:`model_time` (EDM: ``sigma = exp(4 c_noise)``; float64)."""
        m = _as64(m)
        if self.kind != "edm":
            return m
        return _lib(m).exp(4.0 * m)

    # ---- ranges ----------------------------------------------------------------------------------
    @property
    def t_max(self) -> float:
        """Largest usable training time (pure noise end; clipped by ``lambda_min_clipped``)."""
        if self.kind == "discrete":
            n = self.num_train_timesteps
            if math.isfinite(self.lambda_min_clipped):
                clipped = int(np.searchsorted(self._lam_grid[::-1], self.lambda_min_clipped))
                return float(n - clipped - 1)
            return float(n - 1)
        if self.kind == "flow":
            return float(self.num_train_timesteps)
        return float(self.sigma_max)

    @property
    def t_min(self) -> float:
        """Smallest training time with non-zero noise (``0`` for discrete VP, ``1`` for flow
        (``sigma = 1/N``), ``sigma_min`` for EDM)."""
        if self.kind == "discrete":
            return 0.0
        if self.kind == "flow":
            return 1.0
        return float(self.sigma_min)

    def shift_flow_sigma(self, s):
        """SD3's time shift ``shift * s / (1 + (shift - 1) s)`` (Esser et al. 2024, Eq. 23)."""
        return self.shift * s / (1 + (self.shift - 1) * s)


# ----------------------------------------------------------------------------------------------
# step grids
# ----------------------------------------------------------------------------------------------
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


def make_grid(
    schedule: NoiseSchedule,
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
    """Make a step grid on ``schedule``.

    ``spacing``:

    * ``linspace`` / ``leading`` / ``trailing``: uniform in training time with diffusers'
      semantics (Lin et al. 2024, Table 2; ``leading`` adds ``steps_offset``).
    * ``logsnr``: uniform in ``lambda`` (DPM-Solver's ``logSNR`` skip type; diffusers'
      ``use_lu_lambdas``).
    * ``karras``: Karras et al. 2022 Eq. 5 in VE sigma ``sigma/alpha`` with exponent ``rho``.
    * ``exponential``: uniform in ``log(sigma/alpha)``, i.e. uniform in lambda between the same
      end points as ``karras`` (diffusers' ``use_exponential_sigmas``).
    * ``time_power`` (discrete VP schedules): ``t_i = T (1 - i/n)^power - 1`` for ``i = 0 .. n-1``
      with ``T = t_max + 1`` (1000 for a 1000-step model), i.e. ``trailing`` bent towards the clean
      end: ``power = 1`` is ``trailing`` (equal after rounding when ``lambda_min_clipped`` is off),
      ``power = 2`` the discrete form of DPM-Solver's ``time_quadratic`` skip type (Lu et al. 2022,
      official code), whose end point ``t = -1`` here is the data. ``power = 1.3`` had the lowest
      error of this family for the digits teacher (benchmarks/dpm_v3_grid_search.py). A
      ``ValueError`` when the last point would fall below ``t = 0`` (``n^power > T``).
    * ``time_power_zero`` (discrete VP schedules): ``t_i = t_max (1 - i/(n-1))^power`` for
      ``i = 0 .. n-1``: both ends of the schedule are evaluation points, the last one ``t = 0`` (the
      smallest noise level), so the final step into ``sigma = 0`` starts from the data end instead of
      ``t ~ T/n`` (``power = 1``: DPM-Solver's ``time_uniform``, ``2``: ``time_quadratic``, both with
      the end point ``t_0`` evaluated). ``DPMSolverV3Scheduler``'s default grid with ``power = 1.5``
      (docs/dpm-v3.md).

    Explicit ``timesteps`` (training scale, decreasing) or ``sigmas`` (VE ``sigma/alpha`` for VP
    and EDM schedules, flow sigma ``s`` for flow schedules; decreasing; optionally ending with the
    final value) replace the spacing. Flow grids follow diffusers' ``use_flow_sigmas`` layout
    with ``schedule.shift`` applied.

    ``final_sigma``: ``"zero"`` ends the grid at ``sigma = 0`` (sample to the data), ``"sigma_min"``
    at the schedule's smallest noise level. With ``sigma_min`` the lambda-based grids (``logsnr``,
    ``karras``, ``exponential``) place ``n + 1`` points so the last step ends on ``sigma_min``
    (diffusers instead repeats ``sigma_min``, a zero-length step that wastes one evaluation).

    ``round_timesteps`` (default: true for discrete schedules) rounds model times to integers the
    way diffusers does; the solver still uses the exact (unrounded) noise levels, as diffusers'
    Karras/lu grids do.
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass only one of `timesteps` and `sigmas`")
    if timesteps is None and sigmas is None:
        if num_inference_steps is None:
            raise ValueError("pass `num_inference_steps`, `timesteps` or `sigmas`")
        check_num_inference_steps(num_inference_steps)
        if schedule.kind == "discrete" and num_inference_steps > schedule.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} exceeds the model's "
                f"num_train_timesteps={schedule.num_train_timesteps}"
            )
    _check_choice("spacing", spacing, GRID_KINDS)
    _check_choice("final_sigma", final_sigma, ("zero", "sigma_min"))
    if spacing in ("time_power", "time_power_zero") and timesteps is None and sigmas is None:
        if schedule.kind != "discrete":
            raise ValueError(f"spacing={spacing!r} is defined for discrete VP schedules, not kind={schedule.kind!r}")
        power = check_power("power", power)
    if round_timesteps is None:
        round_timesteps = schedule.kind == "discrete"
    n_train = schedule.num_train_timesteps

    exact_t = None  # model times that index the schedule exactly
    t_end = None  # end point of lambda grids with final_sigma="sigma_min"
    if timesteps is not None:
        t = np.asarray(timesteps, dtype=np.float64)
        _check_monotone("timesteps", t)
        if np.any(t < 0) or np.any(t > (n_train if schedule.kind != "discrete" else n_train - 1)):
            raise ValueError(f"timesteps must lie in the training range [0, {n_train}]")
        exact_t = t
    elif sigmas is not None:
        s = np.asarray(sigmas, dtype=np.float64)
        _check_monotone("sigmas", s)
        if np.any(s < 0):
            raise ValueError("sigmas must be >= 0")
        if s[-1] == 0 and len(s) > 1:  # a user grid that already carries its final point
            s, final_sigma = s[:-1], "zero"
        t = _t_of_sigma(schedule, s)
    elif schedule.kind == "flow":
        t = _flow_grid(schedule, num_inference_steps, spacing, rho)
    else:
        lam_grid = spacing in ("logsnr", "karras", "exponential")
        if (lam_grid or spacing == "time_power_zero") and final_sigma == "sigma_min":
            # n + 1 points down to sigma_min, the last being the end point: diffusers appends
            # sigma_min after a grid that already ends there, a zero-length step that wastes an NFE
            t_all = _grid_times(schedule, num_inference_steps + 1, spacing, steps_offset, rho, power)
            t, t_end = t_all[:-1], float(t_all[-1])
        else:
            t = _grid_times(schedule, num_inference_steps, spacing, steps_offset, rho, power)
        if not lam_grid:
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


def _t_of_sigma(schedule: NoiseSchedule, s: np.ndarray) -> np.ndarray:
    if schedule.kind == "flow":
        return s * schedule.num_train_timesteps
    if schedule.kind == "edm":
        return s
    with np.errstate(divide="ignore"):
        return schedule.t_of_lambda(-np.log(s))


def _grid_times(schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int, rho: float,
                power: float = 2.0) -> np.ndarray:
    """Training times of an n-step grid on a discrete VP or EDM schedule (float64, decreasing)."""
    if schedule.kind == "discrete":
        n_train = schedule.num_train_timesteps
        last = int(schedule.t_max) + 1  # diffusers' `last_timestep` after lambda_min_clipped
        if spacing == "time_power_zero":
            return float(schedule.t_max) * (1.0 - np.arange(n) / max(n - 1, 1)) ** power
        if spacing == "time_power":
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
        if spacing == "trailing":
            ratio = n_train / n
            return np.arange(last, 0, -ratio).round() - 1
        lam_lo, lam_hi = float(schedule.lambda_(schedule.t_max)), float(schedule.lambda_(0.0))
    else:  # edm
        if spacing in ("linspace", "leading", "trailing"):
            return np.linspace(schedule.sigma_max, schedule.sigma_min, n)
        lam_lo, lam_hi = -math.log(schedule.sigma_max), -math.log(schedule.sigma_min)
    if spacing == "logsnr":
        lam = np.linspace(lam_lo, lam_hi, n)
    elif spacing == "karras":
        lam = -np.log(karras_sigmas(math.exp(-lam_hi), math.exp(-lam_lo), n, rho))
    else:  # exponential
        lam = np.linspace(lam_lo, lam_hi, n)
    return np.asarray(schedule.t_of_lambda(lam), dtype=np.float64)


def _flow_grid(schedule: NoiseSchedule, n: int, spacing: str, rho: float) -> np.ndarray:
    """Flow-matching model times: diffusers' ``use_flow_sigmas`` grid (shifted) for the
    time-uniform spacings, or a lambda-based grid between the same end points."""
    n_train = schedule.num_train_timesteps
    if spacing in ("linspace", "leading", "trailing"):
        s = 1.0 - np.linspace(1.0, 1.0 / n_train, n + 1)
        s = np.flip(schedule.shift_flow_sigma(s))[:-1].copy()
        return s * n_train
    s_hi = float(schedule.shift_flow_sigma(1.0 - 1.0 / n_train))
    s_lo = float(schedule.shift_flow_sigma(1.0 / n_train))
    lam_lo, lam_hi = math.log((1 - s_hi) / s_hi), math.log((1 - s_lo) / s_lo)
    if spacing == "karras":
        lam = -np.log(karras_sigmas(math.exp(-lam_hi), math.exp(-lam_lo), n, rho))
    else:
        lam = np.linspace(lam_lo, lam_hi, n)
    return schedule.t_of_lambda(lam)


# ----------------------------------------------------------------------------------------------
# prediction conversion (the only place parameterisations are converted)
# ----------------------------------------------------------------------------------------------
def _bcast(v, ref: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=ref.dtype, device=ref.device)
    while v.ndim < ref.ndim:
        v = v.unsqueeze(-1)
    return v


def edm_c_noise(sigma):
    """EDM's noise conditioning ``c_noise(sigma) = log(sigma) / 4`` (Karras et al. 2022, Table 1,
    EDM column): the time value an EDM-preconditioned network is called with. ``sigma`` in VE
    units (``x = x0 + sigma eps``); float, numpy or torch in, float64 out."""
    sigma = _as64(sigma)
    return 0.25 * _lib(sigma).log(sigma)


def edm_preconditioning(sigma, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
    """The EDM preconditioning ``(c_skip, c_out, c_in, c_noise)`` of Karras et al. 2022 (Eq. 7 and
    Table 1, EDM column) at VE noise level ``sigma`` (``x = x0 + sigma eps``)::

        c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out   = +- sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = log(sigma) / 4

    The network ``F`` is called as ``F(c_in x, c_noise)`` and the denoiser (data prediction) is
    ``D(x) = c_skip x + c_out F``. ``prediction_type`` names the sign of ``c_out`` with diffusers'
    EDM-scheduler vocabulary: ``"epsilon"`` is Table 1's ``+`` (``F`` is EDM's ``F_theta``, *not* a
    noise prediction), ``"v_prediction"`` the ``-`` sign, which makes ``F`` the v-prediction
    ``v = a eps - b y0`` of Salimans & Ho 2022 for the VP process ``c_in x = a y0 + b eps`` of the
    normalised data ``y0 = x0 / sigma_data`` (``a = sigma_data c_in``, ``b = sigma c_in``,
    ``a^2 + b^2 = 1``; CosXL). ``c_noise`` is ``-inf`` at ``sigma = 0``, where the network is never
    called. Float, numpy or torch in; float64 out.
    """
    _check_choice("prediction_type", prediction_type, EDM_PREDICTION_TYPES)
    sigma = _as64(sigma)
    lib = _lib(sigma)
    sd = float(sigma_data)
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sigma_data={sigma_data!r} must be a finite number > 0")
    norm = lib.sqrt(sigma * sigma + sd * sd)
    c_skip = sd * sd / (norm * norm)
    c_out = sigma * sd / norm
    if prediction_type == "v_prediction":
        c_out = -c_out
    with np.errstate(divide="ignore"):
        c_noise = edm_c_noise(sigma)
    return c_skip, c_out, 1.0 / norm, c_noise


def to_x0_eps(output: torch.Tensor, sample: torch.Tensor, alpha, sigma, prediction_type: str,
              sigma_data: float | None = None):
    """Convert a raw model output to ``(x0, eps)`` given ``x = alpha x0 + sigma eps``.

    ``prediction_type``:

    * ``epsilon``: output is ``eps`` (Ho et al. 2020).
    * ``v_prediction``: output is ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Eq. 6 for VP;
      then ``x0 = alpha x - sigma v``, ``eps = sigma x + alpha v``).
    * ``sample``: output is ``x0``.
    * ``flow_prediction``: output is the velocity ``u = eps - x0`` (rectified flow, Liu et al.
      2022; SD3). For ``alpha + sigma = 1``: ``x0 = x - sigma u``; in general
      ``x0 = (x - sigma u) / (alpha + sigma)``.

    ``alpha``/``sigma`` are scalars or per-sample tensors (broadcast over trailing dims). At
    ``sigma = 0`` an ``eps`` is not defined by ``x`` and is returned as zeros for ``sample``.

    ``sigma_data`` (EDM models): ``output`` is the raw output ``F`` of an EDM-preconditioned
    network and ``x0 = D(x) = c_skip y + c_out F`` (Karras et al. 2022, Eq. 7) with the Table 1
    coefficients of :func:`edm_preconditioning` at the VE level ``sigma / alpha`` and
    ``y = x / alpha`` (``alpha = 1`` on EDM schedules); ``prediction_type`` is ``"epsilon"`` or
    ``"v_prediction"`` with the meaning given there. ``sample`` is the unscaled state ``x``, not
    the network input ``c_in x``.
    """
    if sigma_data is not None:
        return _edm_to_x0_eps(output, sample, alpha, sigma, prediction_type, sigma_data)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    a, s = _bcast(alpha, output), _bcast(sigma, output)
    if prediction_type == "epsilon":
        eps = output
        x0 = (sample - s * eps) / a
    elif prediction_type == "v_prediction":
        # for VP alpha^2 + sigma^2 = 1; divide by it for schedules where it is not
        norm = a * a + s * s
        x0 = (a * sample - s * output) / norm
        eps = (s * sample + a * output) / norm
    elif prediction_type == "sample":
        x0 = output
        eps = torch.where(s > 0, (sample - a * x0) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x0))
    else:
        x0 = (sample - s * output) / (a + s)
        eps = output + x0
    return x0, eps


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction_type: str,
                sigma_data: float | None = None) -> torch.Tensor:
    """Inverse of :func:`to_x0_eps`: the raw output of type ``prediction_type`` whose ``(x0, eps)``
    are the given ones (used to hand a guided prediction to a scheduler or pipeline).

    With ``sigma_data`` (EDM): the network output ``F = (x0 - c_skip y) / c_out`` with
    ``y = x0 + (sigma/alpha) eps``, i.e. ``F = +-(s x0 / sigma_data - sigma_data eps) /
    sqrt(s^2 + sigma_data^2)`` with ``s = sigma/alpha`` (finite at ``s = 0``)."""
    if sigma_data is not None:
        _check_choice("prediction_type", prediction_type, EDM_PREDICTION_TYPES)
        s_ve = _ve_sigma(sigma, alpha)
        sd = float(sigma_data)
        sign = 1.0 if prediction_type == "epsilon" else -1.0
        s_t = _bcast(s_ve, x0)
        return sign * (s_t * x0 / sd - sd * eps) / _bcast(_lib(s_ve).sqrt(s_ve * s_ve + sd * sd), x0)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    return eps - x0


def _ve_sigma(sigma, alpha):
    """``sigma / alpha`` in float64 (torch when either is a tensor)."""
    if isinstance(sigma, torch.Tensor) or isinstance(alpha, torch.Tensor):
        dev = sigma.device if isinstance(sigma, torch.Tensor) else alpha.device
        return (torch.as_tensor(sigma, dtype=torch.float64, device=dev)
                / torch.as_tensor(alpha, dtype=torch.float64, device=dev))
    return _as64(sigma) / _as64(alpha)


def _edm_to_x0_eps(output, sample, alpha, sigma, prediction_type, sigma_data):
    """:func:`to_x0_eps` for EDM-preconditioned outputs (see there). Coefficients in float64, the
    combination ``c_skip * y + c_out * F`` in the tensors' dtype (diffusers' order of operations)."""
    s_ve = _ve_sigma(sigma, alpha)
    c_skip, c_out, _, _ = edm_preconditioning(s_ve, sigma_data, prediction_type)
    a, s = _bcast(alpha, output), _bcast(sigma, output)
    y = sample / a
    x0 = _bcast(c_skip, output) * y + _bcast(c_out, output) * output
    eps = torch.where(s > 0, (sample - a * x0) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x0))
    return x0, eps
