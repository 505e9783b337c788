"""Consistency functions: boundary scalings, the consistency output of a network and the multistep
consistency sampler (a diffusers-style scheduler).

A consistency model ``f(x_t, t)`` maps any point of a probability-flow ODE trajectory to its end at
the boundary time ``t_min`` (Song et al. 2023, "Consistency Models", Eq. 3 and Sec. 3). fewstep
writes every consistency student as ``f = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)``, where
``x0_hat`` is the data prediction of the network's raw output (of the teacher's ``prediction_type``,
converted with :func:`fewstep.schedule.to_x0_eps`), and ``c_skip(t_min) = 1``, ``c_out(t_min) = 0``
enforce the boundary condition ``f(x, t_min) = x`` by construction. Two choices of the scalings:

* ``"cm"`` -- the CM scalings of Song et al. 2023 (App. C; ``get_scalings_for_boundary_condition``
  of openai/consistency_models) around the EDM preconditioning that the teacher's ``x0_hat``
  implies, written for a VP model: with the VE state ``y = x_t / alpha_t`` and noise level
  ``s = sigma_t / alpha_t`` (``s_min = s(t_min)``, ``sigma_d`` the data std)::

      c_skip_CM = sigma_d^2 / ((s - s_min)^2 + sigma_d^2)   c_out_CM = (s - s_min) sigma_d / sqrt(s^2 + sigma_d^2)
      c_skip_E  = sigma_d^2 / (s^2 + sigma_d^2)              c_out_E  = s sigma_d / sqrt(s^2 + sigma_d^2)

  The EDM raw output implied by ``x0_hat`` is ``F = (x0_hat - c_skip_E y) / c_out_E`` (Karras et al.
  2022, Eq. 7), and ``f = c_skip_CM y + c_out_CM F``, i.e. ``f = (c_skip_CM - r c_skip_E) / alpha_t
  * x_t + r x0_hat`` with ``r = (s - s_min) / s``. For ``s >> s_min`` this is the teacher's own
  ``x0_hat`` (so a student initialised from the teacher starts as the teacher's one-step denoiser)
  and at ``s = s_min`` it is ``y``, the VE state on the boundary.
* ``"lcm"`` -- the LCM scalings (Luo et al. 2023, Eq. 9; diffusers ``LCMScheduler``): with the
  discrete timestep ``t`` and ``timestep_scaling`` (10)::

      c_skip = sigma_d^2 / ((10 t)^2 + sigma_d^2)    c_out = 10 t / sqrt((10 t)^2 + sigma_d^2)

  The boundary is ``t = 0``. A student trained with these scalings samples with diffusers'
  ``LCMScheduler`` unchanged.

Multistep consistency sampling (Song et al. 2023, Algorithm 1; ``LCMScheduler.step``): at each
timestep ``tau_i`` the student's ``f`` gives a clean estimate ``x0``; unless it is the last step,
``x`` is re-noised to the next timestep with *fresh* noise, ``x = alpha(tau_{i+1}) x0 +
sigma(tau_{i+1}) z``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..schedule import NoiseSchedule, to_x0_eps

BOUNDARIES = ("cm", "lcm")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def _as_time(t, device=None) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=device).reshape(-1)


def boundary_scalings(
    t,
    schedule: NoiseSchedule,
    boundary: str = "cm",
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    t_min: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` with ``f = c_skip x_t + c_out x0_hat`` at training-scale times ``t``
    (scalar or (B,)); float64 tensors of shape (B,). See the module docstring for both kinds.
    ``t_min`` is the boundary time (``"cm"``; ``"lcm"`` has its boundary at ``t = 0``). Times below
    ``t_min`` are a ``ValueError``: the consistency function is not defined there."""
    _check("boundary", boundary, BOUNDARIES)
    tt = _as_time(t)
    if bool((tt < t_min - 1e-9).any()):
        raise ValueError(f"consistency times must be >= the boundary time t_min={t_min}, got {tt.min().item()}")
    sd = float(sigma_data)
    if boundary == "lcm":
        scaled = tt * float(timestep_scaling)
        c_skip = sd**2 / (scaled**2 + sd**2)
        c_out = scaled / (scaled**2 + sd**2).sqrt()
        return c_skip, c_out
    s = torch.as_tensor(schedule.sigma_ve(tt.cpu()), dtype=torch.float64)
    alpha = torch.as_tensor(schedule.alpha(tt.cpu()), dtype=torch.float64)
    s_min = float(schedule.sigma_ve(float(t_min)))
    r = (s - s_min) / s
    c_skip_cm = sd**2 / ((s - s_min) ** 2 + sd**2)
    c_skip_e = sd**2 / (s**2 + sd**2)
    return ((c_skip_cm - r * c_skip_e) / alpha).to(tt.device), r.to(tt.device)


def _bcast(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    v = v.to(device=ref.device, dtype=ref.dtype)
    return v.reshape(-1, *([1] * (ref.ndim - 1)))


def consistency_output(
    model_output: torch.Tensor,
    x: torch.Tensor,
    t,
    schedule: NoiseSchedule,
    prediction_type: str,
    boundary: str = "cm",
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    t_min: float = 0.0,
) -> torch.Tensor:
    """The consistency function ``f(x_t, t) = c_skip x_t + c_out x0_hat`` of a network's raw output
    ``model_output`` at state ``x`` and times ``t`` (scalar or (B,)); in ``x``'s dtype."""
    tt = _as_time(t)
    alpha = torch.as_tensor(schedule.alpha(tt.cpu()), dtype=torch.float64)
    sigma = torch.as_tensor(schedule.sigma(tt.cpu()), dtype=torch.float64)
    x0_hat, _ = to_x0_eps(model_output, x, _bcast(alpha, x), _bcast(sigma, x), prediction_type)
    c_skip, c_out = boundary_scalings(tt, schedule, boundary, sigma_data, timestep_scaling, t_min)
    return _bcast(c_skip, x) * x + _bcast(c_out, x) * x0_hat


def lcm_timesteps(num_inference_steps: int, original_inference_steps: int, num_train_timesteps: int) -> list[int]:
    """The timesteps ``LCMScheduler.set_timesteps`` chooses: the "trailing" training grid
    ``k - 1, 2k - 1, ..., N - 1`` (``k = N // original_inference_steps``), reversed, read at
    ``num_inference_steps`` evenly spaced indices (floor). 1 step: [999]; 2: [999, 499]; 4: [999,
    759, 499, 259] for ``N = 1000``, 50 original steps."""
    if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool) \
            or not 1 <= num_inference_steps <= original_inference_steps:
        raise ValueError(f"num_inference_steps must be an integer in [1, {original_inference_steps}], "
                         f"got {num_inference_steps!r}")
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return [int(v) for v in origin[idx]]


@dataclass
class ConsistencySchedulerOutput(BaseOutput):
    """``prev_sample``: the state for the next step (the clean sample after the last step);
    ``denoised``: the consistency function's clean estimate at this step."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class ConsistencyScheduler(SchedulerMixin, ConfigMixin):
    """Multistep consistency sampling for discrete-time VP consistency students, as a diffusers
    scheduler (so :class:`fewstep.models.DigitsPipeline`, :func:`fewstep.sample.sample` and any
    pipeline with the standard scheduler contract run it).

    Each ``step`` turns the raw model output (``prediction_type``) into ``f(x_t, t)`` with the
    student's ``boundary`` scalings (see the module docstring), then re-noises to the next timestep
    with fresh noise drawn from ``generator`` after the model call (the order of
    ``LCMScheduler``, so both draw the same noise). With ``boundary="lcm"`` it computes what
    ``LCMScheduler`` computes (float64 noise levels instead of float32).

    Timesteps for ``n`` steps: ``step_timesteps[str(n)]`` when the config gives a list for ``n``
    (e.g. tuned intermediate times), else :func:`lcm_timesteps` on the training grid of
    ``original_inference_steps`` points; explicit ``timesteps`` override both.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "squaredcos_cap_v2",
        trained_betas=None,
        prediction_type: str = "v_prediction",
        boundary: str = "cm",
        sigma_data: float = 0.5,
        timestep_scaling: float = 10.0,
        boundary_timestep: float = 0.0,
        original_inference_steps: int = 50,
        step_timesteps: dict | None = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        rescale_betas_zero_snr: bool = False,
    ):
        _check("boundary", boundary, BOUNDARIES)
        _check("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        self.noise_schedule = NoiseSchedule.from_config(self.config)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.tensor([], dtype=torch.long)
        self._step_index = None
        self._begin_index = None
        if step_timesteps is not None:
            for key, ts in step_timesteps.items():
                if not (str(key).isdigit() and int(key) == len(ts) and list(ts) == sorted(ts, reverse=True)):
                    raise ValueError(f"step_timesteps[{key!r}] must be {key} decreasing timesteps, got {ts!r}")

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Choose the sampling timesteps: ``timesteps`` (decreasing training-scale times >=
        ``boundary_timestep``) or ``num_inference_steps`` (see the class docstring)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is None:
            table = self.config.step_timesteps or {}
            ts = table.get(str(int(num_inference_steps))) if num_inference_steps is not None else None
            if ts is None:
                ts = lcm_timesteps(num_inference_steps, self.config.original_inference_steps,
                                   self.config.num_train_timesteps)
        else:
            ts = [float(v) for v in timesteps]
            if any(b >= a for a, b in zip(ts, ts[1:])):
                raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
        lo, hi = self.config.boundary_timestep, self.config.num_train_timesteps - 1
        if not ts or min(ts) < lo or max(ts) > hi:
            raise ValueError(f"timesteps must lie in [{lo}, {hi}], got {ts}")
        integral = all(float(v).is_integer() for v in ts)
        self.timesteps = torch.tensor(ts, dtype=torch.long if integral else torch.float64, device=device)
        self.num_inference_steps = len(ts)
        self._step_index = None
        self._begin_index = None

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = torch.as_tensor(timestep).to(self.timesteps.device).to(self.timesteps.dtype)
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {timestep} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
        self._step_index = int(hits[0])

    def consistency(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """``f(sample, timestep)`` of the raw model output (the ``denoised`` of :meth:`step`)."""
        cfg = self.config
        x0 = consistency_output(model_output, sample, float(timestep), self.noise_schedule, cfg.prediction_type,
                                cfg.boundary, cfg.sigma_data, cfg.timestep_scaling, cfg.boundary_timestep)
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """One consistency step: ``denoised = f(sample, timestep)``; then ``prev_sample = alpha(t') denoised
        + sigma(t') z`` at the next timestep ``t'`` with fresh ``z`` (``denoised`` itself after the last)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        denoised = self.consistency(model_output, timestep, sample)
        nxt = self._step_index + 1
        if nxt < len(self.timesteps):
            t_next = float(self.timesteps[nxt])
            a = float(self.noise_schedule.alpha(t_next))
            s = float(self.noise_schedule.sigma(t_next))
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=denoised.dtype)
            prev = a * denoised + s * noise
        else:
            prev = denoised
        self._step_index += 1
        if not return_dict:
            return (prev, denoised)
        return ConsistencySchedulerOutput(prev_sample=prev, denoised=denoised)


GRID_SPACINGS = ("trailing", "linspace", "leading", "logsnr", "karras", "time_power")


def training_grid(schedule: NoiseSchedule, num_steps: int, spacing: str = "trailing", power: float = 1.3) -> np.ndarray:
    """The consistency-distillation grid ``t_0 < t_1 < ... < t_N`` (float64, integer-valued training
    times): the ``num_steps`` timesteps of :func:`fewstep.schedule.make_grid` with ``spacing``
    (rounded to integers, as diffusers does) plus the boundary ``t_0 = schedule.t_min``. With
    ``"trailing"`` and 50 steps this is LCM's DDIM grid ``0, 19, 39, ..., 999`` (diffusers'
    ``DDIMSolver`` with ``num_ddim_timesteps=50``, the boundary replacing its clamped ``-1``)."""
    from ..schedule import make_grid

    _check("grid_spacing", spacing, GRID_SPACINGS)
    grid = make_grid(schedule, num_steps, spacing, power=power, round_timesteps=True)
    pts = np.unique(np.concatenate([np.round(grid.timesteps), [schedule.t_min]]))
    if len(pts) < 2:
        raise ValueError(f"grid with {num_steps} {spacing} steps has fewer than 2 distinct points")
    return pts.astype(np.float64)


def sampling_timesteps(grid: np.ndarray, num_inference_steps: int) -> list[int]:
    """``num_inference_steps`` decreasing sampling times on a training grid (boundary excluded): the
    reversed grid read at evenly spaced indices, floor (``LCMScheduler``'s rule; on LCM's grid it
    gives the same times as :func:`lcm_timesteps`)."""
    pts = np.asarray(grid, dtype=np.float64)[1:][::-1]
    if not 1 <= num_inference_steps <= len(pts):
        raise ValueError(f"num_inference_steps must be in [1, {len(pts)}] on this grid, got {num_inference_steps}")
    idx = np.floor(np.linspace(0, len(pts), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return [int(v) for v in pts[idx]]
