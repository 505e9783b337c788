"""``DPMSolverPPScheduler``: DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) as a diffusers scheduler.

The update formulas are in :mod:`fewstep.samplers.dpmpp_update`; this module keeps the history,
chooses the order per step and plans the singlestep (DPM-Solver-fast) evaluation points.
"""

from __future__ import annotations

import math

import numpy as np
from diffusers.configuration_utils import register_to_config

from .._imports import moved_names
from ..schedule import Grid, check_num_inference_steps
from .dpmpp_update import Point, first_order, multistep_update, second_order, third_order_singlestep
from .scheduler import FewstepScheduler

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = {"midpoint": "midpoint", "heun": "heun", "dpmsolver": "midpoint", "taylor": "heun"}
METHODS = ("multistep", "singlestep")


def multistep_order(order: int, i: int, n: int, config, lam_t: float) -> int:
    """The order of multistep step ``i`` of ``n`` after diffusers' final-step rules: first order on
    the last step with ``euler_at_final``, ``final_sigmas_type="zero"`` or ``lower_order_final``
    below 15 steps (then at most second order on the one before), and into ``sigma = 0``
    (``lam_t = inf``), where divided differences do not exist."""
    if i == n - 1 and (config.euler_at_final or (config.lower_order_final and n < 15)
                       or config.final_sigmas_type == "zero"):
        return 1
    if i == n - 2 and config.lower_order_final and n < 15:
        order = min(order, 2)
    return 1 if not math.isfinite(lam_t) else order


def singlestep_orders(nfe: int, order: int, final_zero: bool) -> list[int]:
    """Per-interval orders of DPM-Solver-fast (Lu et al. 2022a, Sec. 3.4; the official
    ``get_orders_and_timesteps_for_singlestep_solver``) for ``nfe`` model evaluations. With
    ``final_zero`` the last evaluation is a first-order step to ``sigma = 0`` (a higher-order
    stage cannot be placed inside an interval that ends at infinite lambda), and the fast
    schedule covers the other ``nfe - 1``."""
    if final_zero:
        return (singlestep_orders(nfe - 1, order, False) if nfe > 1 else []) + [1]
    if order == 3:
        k, r = nfe // 3 + 1, nfe % 3
        if r == 0:
            return [3] * (k - 2) + [2, 1]
        return [3] * (k - 1) + [r]
    if order == 2:
        return [2] * (nfe // 2) + ([1] if nfe % 2 else [])
    return [1] * nfe


# ------------------------------------------------------------------------------------------------
# the scheduler
# ------------------------------------------------------------------------------------------------
class DPMSolverPPScheduler(FewstepScheduler):
    """DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095; paper Eq. 9-10, Alg. 1-2) as a diffusers scheduler.

    Drop-in for ``DPMSolverMultistepScheduler`` (same keywords and, with coinciding settings, the
    same steps), on discrete VP, flow-matching (SD3/Flux) and EDM/VE (``schedule_kind="edm"``)
    schedules. Additions: ``method="singlestep"`` (DPM-Solver-fast, NFE-counted, :func:`singlestep_orders`),
    the spacings of :func:`fewstep.schedule.make_grid`, ``round_timesteps=False`` (exact float model
    times), ``exact_third_order`` (3M with the exact ``x0''`` weight), ``check_finite`` and the
    CFG++ ``renoise_eps``. ``timesteps``: model times (training scale; EDM ``c_noise``); ``sigmas``:
    diffusers' public sigmas. Options, defaults and the differences from diffusers:
    docs/samplers-reference.md ("DPMSolverPPScheduler").
    """

    supports_renoise = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
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
        method: str = "multistep",
        karras_rho: float = 7.0,
        timestep_power: float = 2.0,
        round_timesteps: bool = True,
        exact_third_order: bool = False,
        check_finite: bool = True,
        schedule_kind: str | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float = 0.5,
        sigma_schedule: str | None = None,
        rho: float | None = None,
    ):
        self._setup()  # maps UniPC's/DEIS' solver and algorithm types first
        algorithm_type, solver_type = self.config.algorithm_type, self.config.solver_type
        if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise ValueError(
                f"algorithm_type={algorithm_type!r} (noise-prediction DPM-Solver) is deprecated in diffusers and not "
                "offered by fewstep; use 'dpmsolver++' or 'sde-dpmsolver++'"
            )
        if algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type={algorithm_type!r} is not supported; allowed: {ALGORITHM_TYPES}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type={solver_type!r} is not supported; allowed: {tuple(SOLVER_TYPES)}")
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported; allowed: {METHODS}")
        if method == "singlestep" and algorithm_type != "dpmsolver++":
            raise ValueError("method='singlestep' supports algorithm_type='dpmsolver++' only (SDE is multistep)")
        self._solver_type = SOLVER_TYPES[solver_type]
        self._reset_history()

    # ---------------------------------------------------------------------- state
    def _reset_history(self) -> None:
        self._stage_state = None  # singlestep: (interval id, x_s, [(lambda, x0), ...])

    def _needs_noise(self) -> bool:
        return self.config.algorithm_type == "sde-dpmsolver++"

    # ---------------------------------------------------------------------- singlestep planning
    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None, sigmas=None):
        """See :meth:`FewstepScheduler.set_timesteps`; for ``method="singlestep"``
        ``num_inference_steps`` is the number of model evaluations and the outer grid gets one point
        per interval of the DPM-Solver-fast order schedule."""
        self._orders = None
        if self.config.method == "singlestep" and num_inference_steps is not None:
            check_num_inference_steps(num_inference_steps)
            self._orders = singlestep_orders(
                int(num_inference_steps), self.config.solver_order, self.config.final_sigmas_type == "zero"
            )
            num_inference_steps = len(self._orders)
        super().set_timesteps(num_inference_steps, device, mu=mu, timesteps=timesteps, sigmas=sigmas)

    def _plan(self, grid: Grid, num_inference_steps) -> Grid:
        if self.config.method != "singlestep":
            return grid
        k = len(grid.timesteps)
        if self._orders is None:
            # explicit timesteps/sigmas list every evaluation (as this scheduler's own timesteps do), so
            # set_timesteps(timesteps=s.timesteps) is idempotent: group them into DPM-Solver-fast intervals
            self._set_plan(singlestep_orders(k, self.config.solver_order, grid.sigmas[-1] == 0))
            return grid
        orders = self._orders
        lam = grid.lambdas
        sched = self.schedule
        t_out, a_out, s_out = [], [], []
        for j in range(k):
            ratios = {1: [0.0], 2: [0.0, 0.5], 3: [0.0, 1.0 / 3.0, 2.0 / 3.0]}[orders[j]]
            for stage, r in enumerate(ratios):
                if stage == 0:
                    t_out.append(grid.timesteps[j])
                    a_out.append(grid.alphas[j])
                    s_out.append(grid.sigmas[j])
                else:
                    t_r = float(sched.t_of_lambda(lam[j] + r * (lam[j + 1] - lam[j])))
                    a_out.append(float(sched.alpha(t_r)))
                    s_out.append(float(sched.sigma(t_r)))
                    t_out.append(round(t_r) if self._rounds_timesteps else t_r)
        self._set_plan(orders)
        return Grid(
            timesteps=np.asarray(t_out, dtype=np.float64),
            alphas=np.append(np.asarray(a_out), grid.alphas[-1]),
            sigmas=np.append(np.asarray(s_out), grid.sigmas[-1]),
        )

    def _set_plan(self, orders: list[int]) -> None:
        """Evaluation ``i`` is stage ``stage`` of interval ``j`` of order ``orders[j]``; interval ``j``
        ends at grid point ``_outer_end[j]``."""
        self._plan_steps = [(j, stage, order) for j, order in enumerate(orders) for stage in range(order)]
        ends = np.cumsum(orders)
        self._outer_end = {j: int(ends[j]) for j in range(len(orders))}

    # ---------------------------------------------------------------------- updates
    def _update(self, i, x, x0, noise):
        if self.config.method == "singlestep":
            return self._singlestep_update(i, x, x0)
        return self._multistep_update(i, x, x0, noise)

    def _point(self, i) -> Point:
        return Point(float(self._lambdas[i]), float(self._alphas[i]), float(self._sigmas[i]))

    def _multistep_update(self, i, x, x0, noise):
        c = self.config
        n = len(self.timesteps)
        s, t = self._point(i), self._point(i + 1)
        # the history is diffusers' model_outputs (newest last), so pipelines that edit it act on the solver
        order = min(c.solver_order, self.lower_order_nums + 1)
        preds = [(float(self._lambdas[i - k]), self.model_outputs[-1 - k]) for k in range(order)]
        order = multistep_order(order, i, n, c, t.lam)
        d2_weight = 2.0 if (c.exact_third_order and noise is None) else 1.0
        return multistep_update(x, s, t, preds, order, self._solver_type, noise, d2_weight)

    def _singlestep_update(self, i, x, x0):
        j, stage, order = self._plan_steps[i]
        p = self._point(i)
        t = self._point(self._outer_end[j])  # the end of the interval
        state = self._stage_state
        if stage == 0:
            self._stage_state = state = (j, x, [(p.lam, x0)], p)
        elif state is None or state[0] != j:
            # entered mid-interval (img2img begin index): first order to the next point
            return first_order(x, p, self._point(i + 1), x0)
        else:
            state[2].append((p.lam, x0))
        _, x_s, preds, s = state
        if order == 1 or stage == 0:  # to the next evaluation point (or the interval end)
            return first_order(x_s, s, self._point(i + 1), preds[0][1])
        if order == 2:
            return second_order(x_s, s, t, preds, self._solver_type)
        if stage == 1:  # 3S, second stage: to the second intermediate point with the Taylor 2nd order
            return second_order(x_s, s, self._point(i + 1), preds, "heun")
        return third_order_singlestep(x_s, s, t, preds, self._solver_type)


# the DPM-Solver++ update functions of fewstep <= 0.1 took 7-12 positional floats and tensors; they now
# take Points (fewstep.samplers.dpmpp_update), the old signatures stay importable from here
_OLD_UPDATES = {"first_order_update": "first_order", "second_order_update": "second_order",
                "third_order_multistep_update": "third_order_multistep",
                "third_order_singlestep_update": "third_order_singlestep"}
__getattr__ = moved_names(__name__, {old: f"fewstep.samplers._legacy:{old}" for old in _OLD_UPDATES},
                          {old: f"fewstep.samplers.dpmpp_update.{new} (takes Point records)"
                           for old, new in _OLD_UPDATES.items()})
