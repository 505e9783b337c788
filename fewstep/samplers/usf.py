"""``USFScheduler``: executes a USF solver schedule (Liu et al., ICLR 2024, arXiv 2312.07243) as a
diffusers scheduler.

Every step is one exponential-integrator Taylor expansion in half log-SNR (DPM-Solver-v3 paper
Eq. 13 through :func:`fewstep.samplers.dpm_v3_update.v3_expansion`) in the step's prediction space:
``data`` (DPM-Solver++: the closed-form statistics ``l = 1, s = 0, b = 0``), ``noise`` (DPM-Solver:
``l = 0, s = -1, b = 0``) or ``v3`` (measured EMS), with the derivatives estimated from the points the
schedule names (:func:`fewstep.samplers.dpm_v3_update.derivative_estimates`), then relaxed. The
schedule format is :mod:`fewstep.samplers.usf_schedule`; docs/usf.md describes both.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from ..schedule import Grid
from .dpm_v3 import EMS_FILENAME, snap_to_ems
from .dpm_v3_update import (
    ClosedFormCoefficients,
    EMSCoefficients,
    NoiseCoefficients,
    V3Point,
    derivative_estimates,
    v3_expansion,
)
from .ems import EMS, resolve_ems_path
from .ems import SHIPPED as SHIPPED_EMS
from .scheduler import FewstepScheduler
from .usf_schedule import USFSchedule, USFStep, ems_fingerprint


def relaxation_factor(kind: str, h: float, space: str, coefficient: float = 0.0) -> float:
    """The factor USF multiplies the estimated first derivative by (official ``relax_derivative``):
    with ``hh = -h`` in the data space and ``hh = h`` otherwise, ``dpmsolver-2``/``unipc-bh2``:
    ``hh (e^hh - 1) / (2 (e^hh - 1 - hh))`` (turns the Taylor 2nd order into DPM-Solver-2's midpoint
    rule), ``unipc-bh1``: ``hh^2 / (2 (e^hh - 1 - hh))``, ``exp``: ``1 + c (e^hh - 1)``, ``linear``:
    ``1 + c h``. ``h = lambda_t - lambda_s > 0``."""
    if kind == "none":
        return 1.0
    if kind == "linear":
        return 1.0 + coefficient * h
    hh = -h if space == "data" else h
    em1 = math.expm1(hh)
    if kind == "exp":
        return 1.0 + coefficient * em1
    rest = em1 - hh  # e^hh - 1 - hh ~ hh^2 / 2
    if kind in ("dpmsolver-2", "unipc-bh2"):
        return 0.5 * hh * em1 / rest
    if kind == "unipc-bh1":
        return 0.5 * hh * hh / rest
    raise ValueError(f"unknown relaxation {kind!r}")


@dataclass
class _Record:
    """What is known at a point: the state (after correction), the state the model saw, the data
    and noise predictions there, and ``f`` per prediction space (cached)."""

    x: torch.Tensor
    x_eval: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    f: dict


class USFScheduler(FewstepScheduler):
    """A USF solver schedule (Liu et al., ICLR 2024) as a diffusers scheduler: per step the timestep,
    the prediction space (``data``, ``noise``, ``v3`` with EMS), the Taylor order, the derivative
    points and relaxation, the corrector, and the analytical first step.

    ``schedule``: a :class:`~fewstep.samplers.usf_schedule.USFSchedule`, its dict, a JSON path or a
    shipped name (``"digits-nfe5"``, ``"digits-cfg2-nfe5"``, ...); stored in the config as a dict, so
    ``save_pretrained``/``from_config`` keep it. ``set_timesteps`` takes the schedule's own points
    whatever ``num_inference_steps`` says (with a warning when it differs from the schedule's NFE)
    and refuses explicit ``timesteps``/``sigmas``. ``ems``: EMS for ``v3`` steps (object, path, folder
    or shipped name); default: the EMS the schedule names when it is a shipped set or an existing
    file. ``round_timesteps``: ``None`` (default) lets the schedule decide (``round_model_times``).
    The grid keywords of the common table (spacings, ``final_sigmas_type``, ...) are accepted and
    ignored: the schedule fixes the points. Details: docs/usf.md.
    """

    supports_renoise = True
    ignore_for_config = ["ems"]
    # None: model times as the schedule says (its round_model_times), decided when it is attached
    _config_overrides = {"round_timesteps": None}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        karras_rho: float = 7.0,
        timestep_power: float = 2.0,
        round_timesteps: bool | None = None,
        check_finite: bool = True,
        schedule=None,
        ems_file: str | None = None,
        ems=None,
    ):
        self.usf_schedule: USFSchedule | None = None
        self.ems: EMS | None = None
        self._setup()
        self._reset_history()
        if schedule is not None:
            self.set_schedule(schedule, ems=ems if ems is not None else ems_file)
        elif ems is not None or ems_file is not None:
            self.ems = self._load_ems(ems if ems is not None else ems_file)

    # ---------------------------------------------------------------------- schedule and EMS
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config`` plus ``schedule=`` (or the config's own ``schedule``) and ``ems=``
        (diffusers drops keywords it does not store in the config, so both are attached after)."""
        ems = kwargs.pop("ems", None)
        cfg = dict(config) if config is not None else {}
        schedule = kwargs.pop("schedule", cfg.pop("schedule", None))
        sched, unused = super().from_config(cfg, return_unused_kwargs=True, **kwargs)
        if ems is None:
            ems = sched.config.ems_file
        if schedule is not None:
            sched.set_schedule(schedule, ems=ems)
        elif ems is not None:
            sched.ems = sched._load_ems(ems)
        return (sched, unused) if return_unused_kwargs else sched

    def set_schedule(self, schedule, ems=None) -> None:
        """Attach a schedule (object, dict, JSON path or shipped name) and, for ``v3`` steps, EMS.
        ``ValueError`` naming the field for a bad schedule, a time outside the model's range, or
        ``v3`` steps without EMS; a ``UserWarning`` when the EMS differ from those the schedule was
        made with (its ``ems.sha256``)."""
        sched = USFSchedule.load(schedule)
        sched.check_schedule(self.schedule)
        if ems is None and sched.uses_v3 and sched.ems and sched.ems.get("name"):
            name = sched.ems["name"]
            if name in SHIPPED_EMS or Path(str(name)).exists():
                ems = name
        self.ems = self._load_ems(ems) if ems is not None else None
        if sched.uses_v3:
            if self.ems is None:
                made = f" (it was made with EMS {sched.ems})" if sched.ems else ""
                raise ValueError(f"the schedule has v3 steps (prediction='v3') but no EMS were given{made}: pass "
                                 "ems= (an EMS, a .safetensors path or a shipped name) to USFScheduler")
            want = (sched.ems or {}).get("sha256")
            got = ems_fingerprint(self.ems)
            if want is not None and want != got:
                warnings.warn(
                    f"the schedule's v3 steps were made with EMS {sched.ems.get('name', '')} sha256={want}, these EMS "
                    f"are sha256={got}: the steps may no longer be the best choice; re-run `fewstep search`",
                    UserWarning, stacklevel=3)
        self.usf_schedule = sched
        self.register_to_config(schedule=sched.to_dict())
        self.num_inference_steps = None
        self._reset_history()

    def _load_ems(self, ems) -> EMS:
        if not isinstance(ems, EMS):
            if not isinstance(ems, (str, os.PathLike)):
                raise TypeError(f"ems must be an EMS, a path or a shipped name, got {type(ems).__name__}")
            ems = EMS.load(resolve_ems_path(ems))
        ems.check_schedule(self.schedule)
        return ems

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save ``scheduler_config.json`` (the schedule is in it) and, when EMS are attached,
        ``ems.safetensors`` (+ ``.json``), named by ``ems_file``."""
        if self.ems is not None:
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            self.ems.save(Path(save_directory) / EMS_FILENAME)
            self.register_to_config(ems_file=EMS_FILENAME)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False, **kwargs):
        """Load ``scheduler_config.json`` from a local folder, with the EMS file it names
        (``ems_file``, relative to the folder)."""
        folder = Path(pretrained_model_name_or_path or ".")
        if subfolder:
            folder = folder / subfolder
        config, unused = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=True, **kwargs)
        name = config.get("ems_file")
        if name and "ems" not in unused:
            cand = Path(name) if Path(name).is_absolute() else folder / name
            unused["ems"] = cand if cand.exists() else name
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **unused)

    # ---------------------------------------------------------------------- grid
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None) -> None:
        """Install the schedule's points. ``num_inference_steps`` is only compared with the schedule's
        NFE (a ``UserWarning`` when they differ); explicit ``timesteps``/``sigmas`` are refused.
        ``timesteps`` lists the evaluation points (without point 0 under the analytical first step)."""
        sched = self.usf_schedule
        if sched is None:
            raise ValueError("USFScheduler has no schedule: pass schedule= (a USFSchedule, a dict, a JSON path or a "
                             "shipped name such as 'digits-nfe5') to the constructor or set_schedule")
        if timesteps is not None or sigmas is not None:
            raise ValueError("a USF schedule fixes its own points: set_timesteps takes no timesteps=/sigmas= "
                             "(edit the schedule instead)")
        if num_inference_steps is not None and int(num_inference_steps) != sched.nfe:
            warnings.warn(f"num_inference_steps={num_inference_steps} ignored: the USF schedule evaluates the model "
                          f"{sched.nfe} times", UserWarning, stacklevel=2)
        if mu is not None:
            self.schedule.set_dynamic_shift(mu)
        ns = self.schedule
        t = np.asarray(sched.timesteps, dtype=np.float64)
        if not sched.ends_at_zero:
            t = np.append(t, float(sched.t_end))
        alphas, sigmas_ = np.asarray(ns.alpha(t), dtype=np.float64), np.asarray(ns.sigma(t), dtype=np.float64)
        self._run_ems, self._ems_idx = None, None
        if sched.uses_v3:  # every point on the EMS grid, as DPMSolverV3Scheduler does
            self._run_ems, idx = snap_to_ems(self.ems, np.log(alphas) - np.log(sigmas_), ns.t_of_lambda, sched.nfe)
            t = self._run_ems.timesteps[idx]
            alphas, sigmas_ = np.asarray(ns.alpha(t), dtype=np.float64), np.asarray(ns.sigma(t), dtype=np.float64)
            self._ems_idx = np.append(idx, -1) if sched.ends_at_zero else idx
        if sched.ends_at_zero:  # the data: alpha = 1, sigma = 0 (VP and flow)
            alphas, sigmas_ = np.append(alphas, 1.0), np.append(sigmas_, 0.0)
        self._all_alphas, self._all_sigmas = alphas, sigmas_
        with np.errstate(divide="ignore"):
            self._all_lambdas = np.log(alphas) - np.log(sigmas_)
        k = sched.num_steps
        self.exact_timesteps = t[:k]  # the solver's points (model times may be rounded copies)
        a = self._afs_offset
        model_t = np.round(t[:k]) if self._round_flag else t[:k]
        self._install(Grid(timesteps=model_t[a:], alphas=alphas[a:], sigmas=sigmas_[a:]), device)
        self._step_index = None
        self._begin_index = None
        self._reset_history()

    @property
    def _round_flag(self) -> bool:
        """Round model times: ``round_timesteps`` when set, else the schedule's ``round_model_times``."""
        r = self.config.round_timesteps
        if r is None:  # the training grid before a schedule is set: integer times, like diffusers
            r = self.usf_schedule.round_model_times if self.usf_schedule is not None else True
        return bool(r)

    @property
    def _afs_offset(self) -> int:
        """1 when point 0 is the analytical first step (not evaluated), else 0."""
        return int(self.usf_schedule is not None and self.usf_schedule.afs != "none")

    @property
    def _rounds_timesteps(self) -> bool:
        return self.schedule.integer_times and self._round_flag

    def _reset_history(self) -> None:
        self._rec: dict[int, _Record] = {}
        self._afs_origin = None
        self._afs_scaled = False

    # ---------------------------------------------------------------------- analytical first step
    def _afs_pending(self) -> bool:
        return (self._afs_offset == 1 and self.num_inference_steps is not None and not self._rec
                and self._current_index() == 0 and self._begin_index in (None, 0))

    def _afs_values(self, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` at point 0 without the model (USF decision 6): ``zero_x0``: ``x0 = 0``
        (``eps = x_T / sigma``); ``mean_x0``: ``x0`` = the data mean ``afs_mean``."""
        sched = self.usf_schedule
        if sched.afs == "zero_x0":
            x0 = torch.zeros_like(x_t)
        else:
            mean = torch.as_tensor(np.asarray(sched.afs_mean, dtype=np.float64), dtype=x_t.dtype, device=x_t.device)
            try:
                x0 = torch.broadcast_to(mean, x_t.shape[1:]).expand_as(x_t)
            except RuntimeError:
                raise ValueError(f"afs_mean of shape {tuple(mean.shape)} does not broadcast to the sample shape "
                                 f"{tuple(x_t.shape[1:])}") from None
        return x0, (x_t - float(self._all_alphas[0]) * x0) / float(self._all_sigmas[0])

    def _afs_state(self, sample: torch.Tensor) -> torch.Tensor:
        """The state at point 1 reached from ``sample`` (at point 0) by the analytical first step."""
        work = torch.promote_types(sample.dtype, torch.float32)
        x_t = sample.to(work)
        x0, eps = self._afs_values(x_t)
        rec = {0: _Record(x=x_t, x_eval=x_t, x0=x0, eps=eps, f={})}
        return self._advance(0, rec)

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input: with an analytical first step, the first call moves ``sample`` (the
        noise at point 0) to point 1, where the model is first evaluated."""
        if self._afs_pending():
            self._afs_scaled = True
            return self._afs_state(sample).to(sample.dtype)
        return super().scale_model_input(sample, timestep, *args, **kwargs)

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True,
             renoise_eps=None):
        """:meth:`FewstepScheduler.step`; on the first step of a schedule with an analytical first step,
        ``sample`` is the noise at point 0 and the model output belongs to point 1."""
        if self._afs_pending():
            if not self._afs_scaled:
                raise ValueError(
                    f"this schedule starts with an analytical first step (afs={self.usf_schedule.afs!r}): the model "
                    "must be called on scheduler.scale_model_input(sample, t), as diffusers pipelines and "
                    "fewstep.sample do, not on the raw sample")
            work = torch.promote_types(sample.dtype, torch.float32)
            self._afs_origin = sample.to(work)
            sample = self._afs_state(sample)
        return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                            return_dict=return_dict, renoise_eps=renoise_eps)

    # ---------------------------------------------------------------------- the step
    def _update(self, i, x, x0, noise):
        j = i + self._afs_offset
        eps = (x - float(self._all_alphas[j]) * x0) / float(self._all_sigmas[j])
        if self._afs_origin is not None and j == 1:  # point 0 of the analytical first step
            x_t = self._afs_origin
            x0_t, eps_t = self._afs_values(x_t)
            self._rec = {0: _Record(x=x_t, x_eval=x_t, x0=x0_t, eps=eps_t, f={})}
            self._afs_origin = None
        elif j - 1 not in self._rec:
            self._rec = {}  # not a continuation (a new begin index): the history starts here
        rec = _Record(x=x, x_eval=x, x0=x0, eps=eps, f={})
        self._rec[j] = rec
        prev = self.usf_schedule.steps[j - 1] if j >= 1 else None
        if prev is not None and prev.corrector is not None and j - 1 in self._rec:
            corrected = self._advance(j - 1, self._rec, corrector=True)
            if corrected is not None:
                rec.x = corrected
        return self._advance(j, self._rec)

    def _space(self, step: USFStep):
        if step.prediction == "data":
            return ClosedFormCoefficients()
        if step.prediction == "noise":
            return NoiseCoefficients()
        return EMSCoefficients(self._run_ems)

    def _point(self, j: int, recs: dict, space: str, src) -> V3Point:
        """The point record of point ``j`` in ``space`` (``f`` set when the point was evaluated)."""
        k = None if self._ems_idx is None else int(self._ems_idx[j])
        p = V3Point(float(self._all_lambdas[j]), float(self._all_alphas[j]), float(self._all_sigmas[j]), index=j, k=k)
        rec = recs.get(j)
        if rec is not None:
            if space not in rec.f:
                if space == "data":
                    rec.f[space] = -rec.x0
                elif space == "noise":
                    rec.f[space] = (p.sigma / p.alpha) * rec.eps
                else:  # v3: f = (sigma eps - l x) / alpha = (1 - l) x / alpha - x0 at the evaluated state
                    src.check_shape(rec.x_eval.shape[1:])
                    rec.f[space] = (1.0 - src.l(p, rec.x_eval)) * rec.x_eval / p.alpha - rec.x0
            p.f = rec.f[space]
            p.x = rec.x
        return p

    def _advance(self, j: int, recs: dict, corrector: bool = False):
        """Step ``j`` (point ``j`` -> ``j + 1``), or its corrector once point ``j + 1`` is evaluated."""
        step = self.usf_schedule.steps[j]
        spec = step.corrector if corrector else step
        order = spec.order
        s_idx = j - step.start
        pts = [j - o for o in step.points]
        if corrector:
            pts = [j + 1] + pts[: order - 2]
        if s_idx not in recs or any(p not in recs for p in pts):
            if corrector:  # entered mid-schedule (img2img): nothing to correct with
                return None
            s_idx, pts, order = j, [], 1  # first order from the current point
        space = step.prediction
        src = self._space(step)
        s = self._point(s_idx, recs, space, src)
        target = self._point(j + 1, {}, space, src)
        if not math.isfinite(target.lam) and space == "v3":
            # into sigma = 0: the v3 data prediction of the (corrected) state, N kept fixed
            return (1.0 - src.l(s, s.x)) * s.x / s.alpha - s.f
        points = [self._point(p, recs, space, src) for p in pts]
        g_s = src.g(s, s)
        derivs = []
        if order > 1:
            lams = [s.lam] + [p.lam for p in points]
            gs = [g_s] + [src.g(p, s) for p in points]
            derivs = derivative_estimates(lams, gs, spec.pseudo)[: order - 1]
            q = None if corrector else step.first_derivative_points
            if q is not None and q < len(points):
                derivs[0] = derivative_estimates(lams[: q + 1], gs[: q + 1], spec.pseudo)[0]
            factor = relaxation_factor(spec.relaxation, target.lam - s.lam, space, spec.relaxation_coefficient)
            if factor != 1.0:
                derivs[0] = derivs[0] * factor
            if not corrector and step.d2_scale != 1.0:
                derivs[1] = derivs[1] * step.d2_scale
        return v3_expansion(s.x, s, target, g_s, derivs, src)
