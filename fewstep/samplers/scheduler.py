"""``FewstepScheduler``: the diffusers scheduler contract, implemented once.

A concrete scheduler only implements :meth:`FewstepScheduler._update` (how to move from grid
point ``i`` to ``i + 1`` given the data prediction ``x0`` at point ``i`` and whatever history it
keeps) and, optionally, :meth:`FewstepScheduler._plan` (to insert intermediate evaluation points,
as singlestep solvers do) and :meth:`FewstepScheduler._reset_history`.

What lives here: config handling for SD / SDXL / SD3 / FlowMatch / UniPC / DEIS / EDM configs
(values mapped as diffusers maps them, misspelt keywords named), diffusers' public state (training
tables, ``model_outputs``, ``lower_order_nums``, ``convert_model_output``, ``compatibles`` by
schedule kind), step grids
(``set_timesteps`` with ``timesteps=`` or ``sigmas=``), ``step_index``/``begin_index``
bookkeeping for img2img and inpainting, ``scale_model_input``, ``add_noise``,
``init_noise_sigma``, the EDM preconditioning of model inputs and times (Karras et al. 2022,
Table 1), prediction conversion, dynamic thresholding, the fp32 upcast, finiteness
checks, CFG++ renoising and ``save_pretrained``/``from_pretrained`` (inherited from diffusers'
``SchedulerMixin``/``ConfigMixin``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..schedule import (
    FLOW_SCHEDULER_CLASSES,
    Grid,
    NoiseSchedule,
    is_cosine_dpm_config,
    is_edm_config,
    is_flow_matching_config,
    make_grid,
    to_x0_eps,
    training_tables,
)
from .config import check_config, config_value, karras_rho, switched_values


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    """Output of ``step``: ``prev_sample`` is ``x`` at the next grid point; ``pred_original_sample``
    is the (thresholded, guided) data prediction ``x0`` the step used."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def threshold_x0(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3): per sample, ``s`` is the
    ``ratio`` quantile of ``|x0|`` clamped to ``[1, max_value]``; ``x0`` is clipped to ``[-s, s]``
    and divided by ``s``. Computed in float32 (``torch.quantile`` needs it; diffusers PR #1349).
    Meant for pixel-space data predictions, not latents."""
    dtype = x0.dtype
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)


#: keywords diffusers' loaders pass on to ``from_config`` (``from_pretrained``, ``load_config``)
LOADER_KEYWORDS = frozenset({
    "cache_dir", "local_dir", "local_dir_use_symlinks", "force_download", "resume_download", "proxies", "token",
    "use_auth_token", "local_files_only", "revision", "subfolder", "user_agent", "mirror", "variant", "torch_dtype",
    "output_loading_info", "return_commit_hash", "dduf_entries", "low_cpu_mem_usage", "use_safetensors",
})


@functools.lru_cache(maxsize=1)
def _scheduler_keywords() -> frozenset:
    """Every keyword some scheduler takes: diffusers' scheduler classes and fewstep's."""
    import diffusers

    names: set[str] = set(LOADER_KEYWORDS)
    classes = [getattr(diffusers, n, None) for n in dir(diffusers) if n.endswith("Scheduler")]
    for c in classes + _fewstep_schedulers():
        try:
            names.update(inspect.signature(c.__init__).parameters)
        except (TypeError, ValueError, ImportError):  # dummy objects of missing optional backends
            continue
    return frozenset(names)


def _warn_unknown_keywords(cls, kwargs: dict) -> None:
    """Warn about explicit ``from_config`` keywords that no scheduler takes (a typo: diffusers would drop
    them silently, as it drops other schedulers' config keys), naming the closest keyword of ``cls``."""
    own = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key, value in kwargs.items():
        if key in own or key.startswith("_") or key in _scheduler_keywords():
            continue
        close = difflib.get_close_matches(key, own, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; {cls.__name__} takes: {', '.join(sorted(own))}"
        warnings.warn(f"{cls.__name__}.from_config got {key}={value!r}, which no scheduler takes (ignored){hint}",
                      UserWarning, stacklevel=3)


def _fewstep_schedulers() -> list[type]:
    """The loaded FewstepScheduler classes that fewstep ships (subclasses defined in ``fewstep.*``)."""
    out, todo = [], list(FewstepScheduler.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if cls.__module__.startswith("fewstep."):
            out.append(cls)
    return out


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Base class of fewstep's diffusers-compatible schedulers (see the module docstring).

    Conventions: ``timesteps`` are what the model is called with (int64 training times for
    discrete VP models, like diffusers' DPM schedulers; float32 for flow matching, like
    ``FlowMatchEulerDiscreteScheduler``; float32 ``c_noise = log(sigma)/4`` for EDM models, like
    ``EDMDPMSolverMultistepScheduler``); ``sigmas`` are diffusers' public sigmas (``sigma/alpha``
    for VP, the flow sigma ``s`` for flow matching, ``sigma`` for EDM) with the final point
    appended; the solver itself works in float64 ``alpha``/``sigma``/``lambda`` arrays.

    EDM models (``schedule_kind="edm"``, set by :meth:`from_config` for EDM configs) are
    preconditioned as in Karras et al. 2022, Eq. 7 / Table 1: :meth:`scale_model_input` returns
    ``c_in x``, ``timesteps`` hold ``c_noise``, and ``step`` reads the model output as EDM's ``F``
    (``x0 = c_skip x + c_out F``, see :func:`fewstep.schedule.edm_preconditioning`); the state
    ``x = x0 + sigma eps`` that ``step`` receives and returns is unscaled.
    """

    # every class a fewstep scheduler may come from; an instance's own list (``compatibles``) depends on
    # its schedule kind (_setup)
    _compatibles = (
        [e.name for e in KarrasDiffusionSchedulers] + list(FLOW_SCHEDULER_CLASSES) + ["EDMDPMSolverMultistepScheduler"]
    )
    order = 1

    def __init_subclass__(cls, **kwargs):
        """diffusers' pipeline loader resolves the loadable base class *by name* in the module
        that ``model_index.json`` records (e.g. ``fewstep.samplers.dpmpp``); make ``SchedulerMixin``
        visible there so ``DiffusionPipeline.from_pretrained`` can load pipelines saved with a
        fewstep scheduler."""
        super().__init_subclass__(**kwargs)
        module = sys.modules.get(cls.__module__)
        if module is not None and not hasattr(module, "SchedulerMixin"):
            module.SchedulerMixin = SchedulerMixin

    # ---------------------------------------------------------------------- configuration
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Like diffusers' ``from_config``, and a flow-matching config (SD3's
        ``FlowMatchEulerDiscreteScheduler``) switches on ``use_flow_sigmas``,
        ``prediction_type="flow_prediction"`` and ``flow_shift=shift`` unless given explicitly
        (recognised by ``_class_name`` on loaded configs, by FlowMatch-only keys on in-memory ones),
        so ``DPMSolverPPScheduler.from_config(sd3_pipe.scheduler.config)`` just works; likewise an
        EDM config (``EDMDPMSolverMultistepScheduler``, ``EDMEulerScheduler``; see
        :func:`fewstep.schedule.is_edm_config`) sets ``schedule_kind="edm"``, and its keywords
        ``sigma_min``, ``sigma_max``, ``sigma_data``, ``sigma_schedule`` and ``rho`` carry over."""
        cfg = dict(config) if isinstance(config, dict) else {}
        if is_cosine_dpm_config(cfg):
            raise ValueError(
                "CosineDPMSolverMultistepScheduler configs are not supported: their noise conditioning "
                "c_noise = atan(sigma) * 2 / pi differs from EDM's log(sigma) / 4"
            )
        if is_edm_config(cfg) and "schedule_kind" not in kwargs:
            if "schedule_kind" not in inspect.signature(cls.__init__).parameters:
                raise ValueError(f"{cls.__name__} does not support EDM/VE configs; use DPMSolverPPScheduler")
            kwargs["schedule_kind"] = "edm"
        if is_flow_matching_config(cfg):
            kwargs.setdefault("use_flow_sigmas", True)
            kwargs.setdefault("prediction_type", "flow_prediction")
            kwargs.setdefault("flow_shift", float(cfg.get("shift", 1.0)))
        _warn_unknown_keywords(cls, kwargs)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _setup(self) -> None:
        """Map the values other diffusers schedulers write (UniPC's ``bh2``, DEIS' ``deis``; see
        :data:`~fewstep.samplers.config.SWITCHED_VALUES`), validate the config and build the noise
        schedule; called in ``__init__`` before the subclass reads its own keywords."""
        mapped = switched_values(self.config)
        if mapped:
            self.register_to_config(**mapped)
        c = self.config
        check_config(c)
        cfg = dict(c)
        if c["use_flow_sigmas"]:
            cfg["schedule_kind"] = "flow"
        self.schedule = NoiseSchedule.from_config(cfg)
        self.schedule.check_prediction_type(c["prediction_type"])
        resolved = self.schedule.scheduler_config(c, self._rho)
        if resolved:  # so a saved config states them (from_config drops keys that were defaults)
            self.register_to_config(**resolved)
        self._set_training_tables()
        self.init_noise_sigma = self.schedule.init_noise_sigma
        self._compatibles = [c.__name__ for c in _fewstep_schedulers() if c.supports_schedule(self.schedule)]
        self._compatibles += list(self.schedule.diffusers_schedulers)
        # default state before set_timesteps: every training timestep, float32 like diffusers
        self._install(self.schedule.training_grid(self.grid_spacing, self._rho), device=None)
        self.timesteps = self.timesteps.to(torch.float32)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._reset_outputs()

    def _set_training_tables(self) -> None:
        """diffusers' public float32 training tables of a discrete (DDPM) schedule, indexed by training
        time: ``betas``, ``alphas = 1 - betas``, ``alphas_cumprod``, ``alpha_t = sqrt(alphas_cumprod)``,
        ``sigma_t = sqrt(1 - alphas_cumprod)``, ``lambda_t = log(alpha_t) - log(sigma_t)``, bit-identical
        to diffusers'. None on flow-matching and EDM schedules, which have no betas."""
        tables = dict.fromkeys(("betas", "alphas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"))
        if self.schedule.alphas_cumprod is not None:
            tables.update(training_tables(self.config))
            ac = tables["alphas_cumprod"]
            tables["alpha_t"], tables["sigma_t"] = torch.sqrt(ac), torch.sqrt(1 - ac)
            tables["lambda_t"] = torch.log(tables["alpha_t"]) - torch.log(tables["sigma_t"])
        for name, value in tables.items():
            setattr(self, name, value)

    @classmethod
    def supports_schedule(cls, schedule: NoiseSchedule) -> bool:
        """Whether this class samples models of ``schedule``'s kind (EDM/VE needs the EDM keywords)."""
        return schedule.sigma_data is None or "schedule_kind" in inspect.signature(cls.__init__).parameters

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes that read this scheduler's config as the same model (diffusers' and
        fewstep's), for UIs that offer a switch: the DDPM-family schedulers for a discrete config, the
        flow-sigma solvers for a flow-matching one, the EDM schedulers for an EDM one."""
        import diffusers

        own = {c.__name__: c for c in _fewstep_schedulers()}
        return [own.get(n) or getattr(diffusers, n) for n in self._compatibles if n in own or hasattr(diffusers, n)]

    @property
    def _rho(self) -> float:
        """The Karras exponent: EDM's ``rho`` when set, else ``karras_rho``."""
        return karras_rho(self.config)

    @property
    def grid_spacing(self) -> str:
        """The effective step-grid kind after mapping diffusers' boolean flags onto it (EDM:
        ``sigma_schedule``, default ``karras`` as in diffusers)."""
        return self.schedule.grid_spacing(self.config)

    # ---------------------------------------------------------------------- timesteps
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Set the sampling grid (call before sampling). The positional order is diffusers'
        ``DPMSolverMultistepScheduler.set_timesteps`` (``num_inference_steps, device, mu, timesteps``).

        Args:
            num_inference_steps: number of model evaluations (steps). Exactly one of this,
                ``timesteps`` and ``sigmas`` must be given.
            device: where ``timesteps`` live.
            mu: dynamic shift of flow models with ``use_dynamic_shifting`` (``flow_shift = exp(mu)``, as
                diffusers); ignored without it, as FlowMatch schedulers ignore it.
            timesteps: explicit decreasing model times on the training scale (EDM: ``c_noise``
                values, as in ``scheduler.timesteps``).
            sigmas: explicit decreasing public sigmas (``sigma/alpha`` for VP, flow sigma for flow
                matching, ``sigma`` for EDM); a trailing ``0`` is taken as the final point.
        """
        given = [x is not None for x in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of `num_inference_steps`, `timesteps` or `sigmas`")
        if device is not None:
            try:
                torch.empty(0, device=device)
            except (RuntimeError, AssertionError, TypeError, ValueError) as err:
                raise ValueError(f"device={str(device)!r} is not available here ({err})") from None
        c = self.config
        # a flow config without dynamic shifting ignores mu, as FlowMatch schedulers do (Flux passes it always);
        # other schedule kinds refuse it
        if mu is not None and (c["use_dynamic_shifting"] or not self.schedule.dynamic_shift):
            if c["time_shift_type"] != "exponential":
                raise ValueError(f"time_shift_type={c['time_shift_type']!r} is not supported with `mu`; allowed: "
                                 "'exponential' (shift = exp(mu), as diffusers' DPM-Solver)")
            self.schedule.set_dynamic_shift(mu)
        explicit = {"sigmas": sigmas} if sigmas is not None else {}
        if timesteps is not None:  # model times (EDM: c_noise values)
            explicit = self.schedule.grid_request(timesteps)
        grid = make_grid(
            self.schedule,
            num_inference_steps,
            self.grid_spacing,
            steps_offset=int(c["steps_offset"] or 0),
            rho=self._rho,
            final_sigma=c["final_sigmas_type"],
            round_timesteps=self._rounds_timesteps,
            power=float(c["timestep_power"]),
            **explicit,
        )
        grid = self._plan(grid, num_inference_steps)
        self._install(grid, device)
        self._step_index = None
        self._begin_index = None
        self._reset_outputs()
        self._reset_history()

    def _install(self, grid: Grid, device) -> None:
        """Store a grid: float64 arrays for the solver, diffusers-style public tensors."""
        self._alphas = np.asarray(grid.alphas, dtype=np.float64)
        self._sigmas = np.asarray(grid.sigmas, dtype=np.float64)
        with np.errstate(divide="ignore"):
            self._lambdas = np.log(self._alphas) - np.log(self._sigmas)
        model_t = self.schedule.model_time(np.asarray(grid.timesteps, dtype=np.float64))
        dtype = torch.int64 if self._rounds_timesteps else torch.float32
        self.timesteps = torch.from_numpy(np.asarray(model_t)).to(device=device, dtype=dtype)
        self.sigmas = torch.from_numpy(self.schedule.public_sigmas(self._alphas, self._sigmas).astype(np.float32))
        self.num_inference_steps = len(grid.timesteps)

    @property
    def _rounds_timesteps(self) -> bool:
        """Model times are rounded to integers (diffusers' discrete schedulers; ``round_timesteps``)."""
        return self.schedule.integer_times and bool(self.config["round_timesteps"])

    def _plan(self, grid: Grid, num_inference_steps: int | None) -> Grid:
        """Hook: turn the step grid into the list of evaluation points (default: unchanged)."""
        return grid

    def _reset_history(self) -> None:
        """Hook: forget all per-generation state (called by ``set_timesteps``)."""

    def _reset_outputs(self) -> None:
        """diffusers' history of data predictions: ``model_outputs`` (``solver_order`` entries, newest
        last, ``None`` until filled) and ``lower_order_nums`` (steps taken, up to ``solver_order``)."""
        self.model_outputs: list[torch.Tensor | None] = [None] * int(config_value(self.config, "solver_order"))
        self.lower_order_nums = 0

    # ---------------------------------------------------------------------- index bookkeeping
    @property
    def step_index(self) -> int | None:
        """Index of the current grid point; advances by one per ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index, set by img2img/inpaint pipelines through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start sampling at grid index ``begin_index`` (img2img ``strength < 1``)."""
        if not 0 <= int(begin_index) < len(self.timesteps):
            raise ValueError(f"begin_index={begin_index} is outside [0, {len(self.timesteps) - 1}]")
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Grid index of ``timestep``; like diffusers, the second match when a time repeats and the
        last index when it is not on the grid."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        cand = (schedule_timesteps == timestep).nonzero()
        if len(cand) == 0:
            return len(self.timesteps) - 1
        return int(cand[1 if len(cand) > 1 else 0].item())

    def _init_step_index(self, timestep) -> None:
        """First step: the begin index when a pipeline set one (img2img); else the grid index of
        ``timestep``, except that the very first grid time means index 0 even when rounding made it
        repeat (e.g. 999, 999 on a logSNR grid of a cosine schedule), where diffusers' second-match
        rule would skip a point and fail at the end of sampling."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif bool(torch.as_tensor(timestep).to(self.timesteps.device, self.timesteps.dtype) == self.timesteps[0]):
            self._step_index = 0
        else:
            self._step_index = self.index_for_timestep(timestep)

    # ---------------------------------------------------------------------- small contract items
    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input at the current step.

        VP and flow schedules: ``x_t`` as is (identity). EDM schedules: ``c_in x`` with
        ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` (Karras et al. 2022, Table 1) at the current
        grid point; like diffusers' EDM schedulers, the first call locates the step index from
        ``timestep`` (a ``c_noise`` value of ``timesteps``) when none is set yet. Keeps
        ``sample``'s dtype.
        """
        if self.schedule.sigma_data is None:  # not a preconditioned (EDM) network
            return sample
        if self._step_index is None and self._begin_index is None and timestep is not None:
            self._init_step_index(timestep)
        i = self._current_index()
        return sample * self.schedule.c_in(self._alphas[i], self._sigmas[i])

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]

    def alpha_sigma(self, index: int | None = None) -> tuple[float, float]:
        """``(alpha, sigma)`` of grid point ``index`` (default: the current step) as floats."""
        i = self._current_index() if index is None else int(index)
        return float(self._alphas[i]), float(self._sigmas[i])

    def _current_index(self) -> int:
        if self._step_index is not None:
            return self._step_index
        return self._begin_index or 0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward-noise ``original_samples`` to ``timesteps``: ``alpha x0 + sigma noise``.

        After ``set_begin_index`` (img2img) the noise level of the begin point is used (so it
        matches the grid exactly even when model times were rounded); otherwise each timestep's
        grid point, or the schedule itself for times off the grid (training use).
        """
        if original_samples.shape != noise.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(original_samples.shape)}")
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is not None or self._step_index is not None:
            i = self._step_index if self._step_index is not None else self._begin_index
            a = np.full(len(timesteps), self._alphas[i])
            s = np.full(len(timesteps), self._sigmas[i])
        else:
            a, s = [], []
            grid_t = self.timesteps.cpu()
            for t in timesteps.cpu():
                hit = (grid_t == t.to(grid_t.dtype)).nonzero()
                if len(hit):
                    i = self.index_for_timestep(t.to(grid_t.dtype), grid_t)
                    a.append(self._alphas[i])
                    s.append(self._sigmas[i])
                else:
                    t_s = float(self.schedule.t_of_model_time(float(t)))
                    a.append(float(self.schedule.alpha(t_s)))
                    s.append(float(self.schedule.sigma(t_s)))
            a, s = np.asarray(a), np.asarray(s)
        if len(a) == 1 and original_samples.shape[0] > 1:
            a, s = np.repeat(a, original_samples.shape[0]), np.repeat(s, original_samples.shape[0])
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = torch.tensor(a, dtype=original_samples.dtype, device=original_samples.device).reshape(shape)
        s = torch.tensor(s, dtype=original_samples.dtype, device=original_samples.device).reshape(shape)
        return a * original_samples + s * noise

    # ---------------------------------------------------------------------- the step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        renoise_eps: torch.Tensor | None = None,
    ) -> FewstepSchedulerOutput | tuple:
        """Advance ``sample`` from the current grid point to the next one.

        Args:
            model_output: raw model output of type ``config.prediction_type`` at ``sample`` (EDM:
                the preconditioned network's ``F`` at ``scale_model_input(sample)``).
            timestep: the current model time (used to find the index on the first call).
            sample: current ``x_t`` (EDM: the unscaled ``x0 + sigma eps``); computed on in at least
                float32 (fp16/bf16 are upcast, like diffusers; float64 stays float64), returned in
                ``model_output.dtype``.
            generator: RNG for the noise of SDE solvers (drawn with diffusers' ``randn_tensor``
                in the same order as diffusers, so equal generators give equal noise).
            variance_noise: explicit noise for SDE solvers instead of ``generator``.
            renoise_eps: CFG++ renoise protocol (Chung et al. 2024, Eq. 9): when given, the step
                restarts from ``alpha_s x0 + sigma_s renoise_eps`` (the guided data prediction
                renoised with the *unconditional* noise) instead of ``sample``.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(...) before step(...)")
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch tensors")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self.timesteps):
            raise ValueError(f"step called {i + 1} times but the grid has {len(self.timesteps)} steps")
        c = self.config
        out = self._mean_output(model_output, sample, i)
        if c["check_finite"] and not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"model output at step {i} (timestep {float(self.timesteps[i])}) contains NaN or inf"
            )
        work = torch.promote_types(sample.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
        x = sample.to(work)
        x0 = self._data_prediction(out.to(work), x, i)
        if renoise_eps is not None:
            if not getattr(self, "supports_renoise", False):
                raise ValueError(f"{type(self).__name__} does not support the CFG++ renoise protocol")
            x = self._alphas[i] * x0 + self._sigmas[i] * renoise_eps.to(work)
        noise = None
        if self._needs_noise():
            if variance_noise is not None:
                noise = variance_noise.to(device=out.device, dtype=work)
            else:
                from diffusers.utils.torch_utils import randn_tensor

                noise = randn_tensor(out.shape, generator=generator, device=out.device, dtype=torch.float32).to(work)
        for j in range(len(self.model_outputs) - 1):  # diffusers' history, newest last
            self.model_outputs[j] = self.model_outputs[j + 1]
        self.model_outputs[-1] = x0
        prev = self._update(i, x, x0, noise)
        if self.lower_order_nums < len(self.model_outputs):
            self.lower_order_nums += 1
        self._step_index = i + 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)  # as diffusers; x0 is the output object's pred_original_sample
        return FewstepSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _mean_output(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """``model_output`` without the variance channels of ``learned``/``learned_range`` models,
        checked against ``sample``'s shape."""
        out = model_output
        if self.config["variance_type"] in ("learned", "learned_range") and out.shape[1] == 2 * sample.shape[1]:
            out = out[:, : sample.shape[1]]
        if out.shape != sample.shape:
            raise ValueError(
                f"model_output shape {tuple(out.shape)} does not match sample shape {tuple(sample.shape)} "
                f"at step {i}"
            )
        return out

    def _data_prediction(self, out: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """The data prediction ``x0`` of the raw output ``out`` at grid point ``i`` (thresholded when
        configured), in the dtype of ``x``."""
        c = self.config
        x0, _ = to_x0_eps(out, x, self._alphas[i], self._sigmas[i], c["prediction_type"],
                          sigma_data=self.schedule.sigma_data)
        if c["thresholding"]:
            x0 = threshold_x0(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
        return x0

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None,
                             **kwargs) -> torch.Tensor:
        """diffusers' ``convert_model_output`` for DPM-Solver++: the data prediction ``x0`` of
        ``model_output`` at the current step (``step_index``; before the first step the begin index or
        0), thresholded when configured, in ``model_output``'s dtype. A positional timestep is accepted
        and ignored, as diffusers does."""
        if sample is None:
            if len(args) < 2:
                raise ValueError("convert_model_output needs `sample` (the current x_t)")
            sample = args[1]
        i = self._current_index()
        work = torch.promote_types(sample.dtype, torch.float32)
        out = self._mean_output(model_output, sample, i).to(work)
        return self._data_prediction(out, sample.to(work), i).to(model_output.dtype)

    def _needs_noise(self) -> bool:
        return False

    def _update(self, i: int, x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Move ``x`` from grid point ``i`` to ``i + 1`` given the data prediction ``x0`` at ``i``."""
        raise NotImplementedError
