"""``DPMSolverV3Scheduler``: DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023, arXiv 2310.13268) as a
diffusers scheduler: EMS handling (loading, snapping the grid onto them, refinement), the history,
the orders and the corrector. The update itself is :func:`fewstep.samplers.dpm_v3_update.v3_update`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from diffusers.configuration_utils import register_to_config

from .._imports import moved_names
from ..schedule import Grid, NoiseSchedule
from .dpm_v3_update import ClosedFormCoefficients, EMSCoefficients, V3Point, v3_update
from .ems import EMS, resolve_ems_path
from .scheduler import FewstepScheduler

MAX_REFINE = 16  # finest interpolation of an EMS grid for sampling grids finer than it
EMS_FILENAME = "ems.safetensors"
HALF_REGIONS = ("noisy", "clean")
# defaults measured on exact Gaussian mixtures and the digits teacher (docs/dpm-v3.md,
# benchmarks/dpm_v3_consistency.py): a time grid with both ends evaluated, bent towards the data
DEFAULT_GRID = "time_power_zero"  # discrete VP schedules
DEFAULT_GRID_OTHER = "logsnr"  # flow-matching schedules (the time_power grids are discrete-VP only)
DEFAULT_POWER = 1.5
DEFAULT_ORDER = 3
# keys of another scheduler's config that state *its* solver and step grid: from_config leaves them
# out (v3's own defaults apply) unless they are passed explicitly
SOLVER_KEYS = {"solver_order": DEFAULT_ORDER, "timestep_spacing": None, "timestep_power": DEFAULT_POWER,
               "use_karras_sigmas": False, "use_lu_lambdas": False, "use_exponential_sigmas": False,
               "use_beta_sigmas": False, "steps_offset": 0, "karras_rho": 7.0}
V3_ONLY_KEYS = ("degenerated", "predictor_pseudo", "half_region")  # present in every v3 config


def snap_to_ems(ems: EMS, lambdas: np.ndarray, t_of_lambda, num_points: int) -> tuple[EMS, np.ndarray]:
    """``(run_ems, idx)``: the nearest EMS grid index of each (finite) lambda, the official snapping
    ``round(N (lambda - lambda_0) / (lambda_N - lambda_0))`` (a ``ValueError`` outside the EMS range).
    When two points would snap onto one grid point (a zero-length step), the EMS linearly
    interpolated onto the smallest finer grid that separates them (:meth:`EMS.refined`, up to
    ``MAX_REFINE`` times, with a warning) and the indices on it. ``t_of_lambda``: the schedule's
    inverse of lambda; ``num_points``: the number of sampling points, for messages."""
    idx = ems.index_of(lambdas)  # also checks the points lie inside the EMS range
    factor = 1
    while len(np.unique(idx)) != len(idx):
        # more sampling points than the EMS grid resolves: snapping would merge points (a
        # zero-length step); sample on a finer, interpolated copy of the EMS instead
        factor += 1
        if factor > MAX_REFINE:
            raise ValueError(f"{num_points} steps put several points on the same EMS grid point even "
                             f"on a {MAX_REFINE}x refined EMS grid (num_grid={ems.num_grid})")
        idx = ems.index_of(lambdas, refine=factor)
    if factor == 1:
        return ems, idx
    warnings.warn(
        f"{num_points} sampling points are finer than the EMS grid (num_grid={ems.num_grid}): "
        f"using the EMS linearly interpolated onto a {factor}x finer grid; compute EMS with a larger "
        "num_grid to measure them there", UserWarning, stacklevel=4)
    return ems.refined(factor, t_of_lambda), idx


class DPMSolverV3Scheduler(FewstepScheduler):
    """DPM-Solver-v3 (Zheng et al., NeurIPS 2023, arXiv 2310.13268): multistep predictor of order
    1-3 (paper Alg. 1 / Eq. 13), pseudo-order derivative estimates, and the corrector without extra
    model evaluations (paper Sec. 3.3, Alg. 2).

    Takes the ``DPMSolverMultistepScheduler`` keywords (same meaning where they apply) plus:

    * ``ems``: an :class:`~fewstep.samplers.ems.EMS`, a path to an EMS file, a folder with
      ``ems.safetensors``, or a shipped name (``"digits"``, ``"digits-cfg2"``); also through
      ``from_config(config, ems=...)`` and ``from_pretrained(folder)`` (``ems_file`` in the config).
      Without EMS the scheduler warns and runs ``degenerated``.
    * ``degenerated``: use ``l = 1, s = 0, b = 0`` (DPM-Solver++ in v3 form, paper App. A.2).
    * ``predictor_pseudo`` / ``corrector_pseudo`` (official ``p_pseudo`` / ``c_pseudo``).
    * ``use_corrector``, ``half`` and ``half_region`` (``"clean"``, the paper text's half, default;
      ``"noisy"``, the official code's): with ``half=True`` the corrector runs on half of the trajectory.
    * ``lower_order_final``: as the official v3, orders ``<= n - i`` on the last steps at any number of steps.

    Every sampling point is snapped to the nearest EMS grid point in lambda and the model is called
    at its exact float time; grids finer than the EMS grid run on an interpolated, refined EMS.
    Units: ``timesteps`` on the training scale, lambdas = half log-SNR. Details:
    docs/samplers-reference.md ("DPMSolverV3Scheduler").
    """

    supports_renoise = True
    ignore_for_config = ["ems"]
    # None: exact float model times when EMS are loaded, diffusers' integer rounding without (set_ems)
    # v3's own defaults (docs/dpm-v3.md, "Defaults"): its grid is chosen per schedule kind in __init__
    _config_overrides = {"round_timesteps": None, "timestep_spacing": None, "timestep_power": DEFAULT_POWER,
                         "solver_order": DEFAULT_ORDER}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = DEFAULT_ORDER,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predictor_pseudo: bool = False,
        use_corrector: bool = True,
        corrector_pseudo: bool = False,
        half: bool = False,
        half_region: str = "clean",
        lower_order_final: bool = True,
        degenerated: bool = False,
        ems_file: str | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        karras_rho: float = 7.0,
        timestep_power: float = DEFAULT_POWER,
        round_timesteps: bool | None = None,
        check_finite: bool = True,
        ems=None,
    ):
        if half_region not in HALF_REGIONS:
            raise ValueError(f"half_region={half_region!r} is not supported; allowed: {HALF_REGIONS}")
        self.ems: EMS | None = None
        self._run_ems: EMS | None = None
        self._round_auto = round_timesteps is None
        if self._round_auto:
            self.register_to_config(round_timesteps=True)
        if timestep_spacing is None:  # v3's default grid for this kind of schedule
            vp = not use_flow_sigmas and NoiseSchedule.from_config(dict(self.config)).kind == "discrete"
            self.register_to_config(timestep_spacing=DEFAULT_GRID if vp else DEFAULT_GRID_OTHER)
        self._setup()
        if ems is None and ems_file is not None and not degenerated:
            ems = ems_file
        self.set_ems(ems, warn=not degenerated)
        self._reset_history()

    # ---------------------------------------------------------------------- EMS handling
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, ems=None, **kwargs):
        """diffusers' ``from_config`` plus ``ems=`` (an :class:`EMS`, a path or a shipped name).

        From another scheduler's config (e.g. ``pipe.scheduler.config``) v3 reads the noise
        schedule and prediction type but not that scheduler's solver order and step grid
        (``solver_order``, ``timestep_spacing``, ``use_karras_sigmas``, ... in :data:`SOLVER_KEYS`):
        those stay at v3's defaults unless passed here. A v3 config keeps all of its keys."""
        if config is not None and not any(k in config for k in V3_ONLY_KEYS):
            for key, value in SOLVER_KEYS.items():
                kwargs.setdefault(key, value)
        with warnings.catch_warnings():
            if ems is not None:  # attached right below; no "no EMS" warning from __init__
                warnings.simplefilter("ignore", UserWarning)
            sched, unused = super().from_config(config, return_unused_kwargs=True, **kwargs)
        unused.pop("ems", None)
        if ems is not None and sched.ems is None and not sched.config.degenerated:
            sched.set_ems(ems)
        return (sched, unused) if return_unused_kwargs else sched

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False, **kwargs):
        """Load ``scheduler_config.json`` and the EMS file it names (``ems_file``, resolved relative
        to the folder; default ``ems.safetensors`` when present) from a local folder."""
        ems = kwargs.pop("ems", None)
        folder = Path(pretrained_model_name_or_path or ".")
        if subfolder:
            folder = folder / subfolder
        config, unused = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=True, **kwargs)
        if ems is None:
            name = config.get("ems_file") or EMS_FILENAME
            cand = Path(name) if Path(name).is_absolute() else folder / name
            if cand.exists():
                ems = cand
            elif config.get("ems_file"):
                raise FileNotFoundError(f"the scheduler config names ems_file={name!r} but {cand} does not exist")
        config = dict(config)
        ems_file = config.pop("ems_file", None)
        out = cls.from_config(config, return_unused_kwargs=return_unused_kwargs, ems=ems, **unused)
        sched = out[0] if return_unused_kwargs else out
        if ems_file is not None:
            sched.register_to_config(ems_file=ems_file)
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save ``scheduler_config.json`` and, when EMS are loaded, ``ems.safetensors`` (+ ``.json``)."""
        if self.ems is not None:
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            self.ems.save(Path(save_directory) / EMS_FILENAME)
            self.register_to_config(ems_file=EMS_FILENAME)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def set_ems(self, ems, warn: bool = True) -> None:
        """Attach EMS (object, path, folder or shipped name) after checking them against this
        scheduler's noise schedule; ``None`` falls back to ``degenerated`` (with a warning)."""
        c = self.config
        if ems is not None and not isinstance(ems, EMS):
            if not isinstance(ems, (str, os.PathLike)):
                raise TypeError(f"ems must be an EMS, a path or a shipped name, got {type(ems).__name__}")
            ems = EMS.load(resolve_ems_path(ems))
        if ems is not None:
            ems.check_schedule(self.schedule)
        elif not c.degenerated and warn:
            warnings.warn(
                "DPMSolverV3Scheduler got no EMS: falling back to degenerated=True (l=1, s=0, b=0, i.e. "
                "DPM-Solver++ with the v3 corrector). Compute EMS with fewstep.samplers.compute_ems or `fewstep ems`.",
                UserWarning,
                stacklevel=3,
            )
        self.ems = ems
        self._run_ems = ems
        if getattr(self, "_round_auto", False):
            # model times: exact snapped (float) times with EMS, diffusers' integer rounding without
            self.register_to_config(round_timesteps=not self.uses_ems)
        self._reset_history()

    @property
    def uses_ems(self) -> bool:
        """Whether EMS (not the degenerate statistics) drive the updates."""
        return self.ems is not None and not self.config.degenerated

    # ---------------------------------------------------------------------- grid
    def _plan(self, grid: Grid, num_inference_steps) -> Grid:
        self._ems_idx = None
        self._run_ems = self.ems
        if not self.uses_ems:
            return grid
        lam = grid.lambdas
        finite = np.isfinite(lam)
        self._run_ems, idx = snap_to_ems(self.ems, lam[finite], self.schedule.t_of_lambda, len(grid.timesteps))
        ems = self._run_ems
        n = len(grid.timesteps)
        ts_all = ems.timesteps[idx]
        alphas = np.asarray(self.schedule.alpha(ts_all), dtype=np.float64)
        sigmas = np.asarray(self.schedule.sigma(ts_all), dtype=np.float64)
        if not finite[-1]:  # final point sigma = 0
            alphas, sigmas = np.append(alphas, grid.alphas[-1]), np.append(sigmas, grid.sigmas[-1])
            full_idx = np.append(idx, -1)
        else:
            full_idx = idx
        self._ems_idx = full_idx
        model_t = ts_all[:n]
        if bool(self.config.round_timesteps):
            model_t = np.round(model_t)
        return Grid(timesteps=model_t, alphas=alphas, sigmas=sigmas)

    # ---------------------------------------------------------------------- state
    def _reset_history(self) -> None:
        self._hist: list[V3Point] = []  # newest first
        self._prev_p_order = 0

    def _point(self, i: int) -> V3Point:
        k = None if getattr(self, "_ems_idx", None) is None else int(self._ems_idx[i])
        return V3Point(float(self._lambdas[i]), float(self._alphas[i]), float(self._sigmas[i]), index=i, k=k)

    @property
    def coefficients(self) -> EMSCoefficients | ClosedFormCoefficients:
        """The coefficient source of the update: the (possibly refined) EMS, or the closed form."""
        return EMSCoefficients(self._run_ems) if self.uses_ems else ClosedFormCoefficients()

    def _corrector_active(self, p: V3Point) -> bool:
        c = self.config
        if not c.use_corrector:
            return False
        if not c.half:
            return True
        sched = self.schedule
        t = float(sched.t_of_lambda(p.lam))
        mid = sched.t_min + 0.5 * (sched.t_max - sched.t_min)
        return t > mid if c.half_region == "noisy" else t <= mid

    # ---------------------------------------------------------------------- the step
    def _update(self, i, x, x0, noise):
        c = self.config
        n = len(self.timesteps)
        src = self.coefficients
        src.check_shape(x.shape[1:])
        p = self._point(i)
        l_s = src.l(p, x)
        # f = (sigma eps - l x) / alpha = (1 - l) x / alpha - x0   (x0 = (x - sigma eps) / alpha)
        p.f = (1.0 - l_s) * x / p.alpha - x0
        hist = self._hist
        if hist and hist[0].index != i - 1:
            hist.clear()  # not a continuation of the previous step (e.g. a new begin index)
        if hist and self._corrector_active(p):
            c_order = min(self._prev_p_order + int(c.corrector_pseudo), len(hist) + 1)
            if c_order > 1:  # redo the step into p with p's own value among the points (paper Alg. 2)
                prev = hist[0]
                x = v3_update(prev.x, [prev, p] + hist[1:], p, c_order, src, c.corrector_pseudo)
        p.x = x
        hist.insert(0, p)
        del hist[c.solver_order + 1 :]
        order = min(c.solver_order, len(hist))
        if c.lower_order_final:
            order = min(order, n - i)
        target = self._point(i + 1)
        self._prev_p_order = order
        if not math.isfinite(target.lam):
            # into sigma = 0: the data prediction of the (corrected) state, N kept fixed
            return (1.0 - l_s) * x / p.alpha - p.f
        return v3_update(x, hist, target, order, src, c.predictor_pseudo)


# moved to fewstep.samplers.dpm_v3_update
__getattr__ = moved_names(__name__, {"_psi": "fewstep.samplers.dpm_v3_update:psi",
                                     "derivative_estimates": "fewstep.samplers.dpm_v3_update:derivative_estimates"})
