"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): multistep, singlestep and SDE variants.

All updates are in *data-prediction* form: with ``h = lambda_t - lambda_s`` the exact solution
of the probability-flow ODE is (paper Eq. 9)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda

and the solvers Taylor-expand ``x0`` in ``lambda``. ``phi1 = expm1(-h)``; ``ms`` are data
predictions, newest first. The pure functions below take python floats for the noise levels
(computed in float64) and tensors for states; coefficients are applied to float32 tensors.

SDE-DPM-Solver++ (paper Sec. 5 / App. B; diffusers ``sde-dpmsolver++``) adds the exact Gaussian
transition of the VP SDE: ``x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) x0
+ sigma_t sqrt(1 - e^{-2h}) z`` plus the same derivative corrections with SDE weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from ..schedule import Grid, check_num_inference_steps
from .scheduler import FewstepScheduler

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = {"midpoint": "midpoint", "heun": "heun", "dpmsolver": "midpoint", "taylor": "heun"}
METHODS = ("multistep", "singlestep")


# ------------------------------------------------------------------------------------------------
# pure update functions
# ------------------------------------------------------------------------------------------------
def first_order_update(x, m0, lam_s, lam_t, a_t, s_t, s_s, noise=None):
    """DPM-Solver++(1) = DDIM (paper Eq. 10 with k = 1):
    ``x_t = (sigma_t/sigma_s) x - alpha_t expm1(-h) m0``; with ``noise``, SDE-DPM-Solver++1.
    ``lam_t`` may be ``inf`` (``sigma_t = 0``): the step then returns ``alpha_t m0``."""
    h = lam_t - lam_s
    if noise is None:
        return (s_t / s_s) * x - (a_t * math.expm1(-h)) * m0
    e2 = math.exp(-2.0 * h)
    return (s_t / s_s * math.exp(-h)) * x + (a_t * (1.0 - e2)) * m0 + (s_t * math.sqrt(1.0 - e2)) * noise


def second_order_update(x, m0, lam_s, m1, lam_1, lam_t, a_t, s_t, s_s, solver_type="midpoint", noise=None):
    """Second-order DPM-Solver++ from ``x`` at ``lam_s`` with data predictions ``m0`` (at
    ``lam_s``) and ``m1`` (at ``lam_1``, behind for multistep 2M, ahead for singlestep 2S).

    ``D1 = (m1 - m0) / r`` with ``r = (lam_1 - lam_s) / h`` (paper Alg. 2 for 2M, Alg. 1 for 2S);
    ``midpoint``: ``x_t = (sigma_t/sigma_s) x - alpha_t phi1 m0 - 0.5 alpha_t phi1 D1``;
    ``heun`` (official "taylor"): ``... + alpha_t (phi1/h + 1) D1``.
    """
    h = lam_t - lam_s
    d1 = (m1 - m0) * (h / (lam_1 - lam_s))
    if noise is None:
        phi1 = math.expm1(-h)
        x_t = (s_t / s_s) * x - (a_t * phi1) * m0
        if solver_type == "midpoint":
            return x_t - (0.5 * a_t * phi1) * d1
        return x_t + (a_t * (phi1 / h + 1.0)) * d1
    e2 = math.exp(-2.0 * h)
    x_t = (s_t / s_s * math.exp(-h)) * x + (a_t * (1.0 - e2)) * m0 + (s_t * math.sqrt(1.0 - e2)) * noise
    if solver_type == "midpoint":
        return x_t + (0.5 * a_t * (1.0 - e2)) * d1
    return x_t + (a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)) * d1


def third_order_multistep_update(x, ms, lams, lam_t, a_t, s_t, s_s, noise=None, d2_weight=1.0):
    """DPM-Solver++(3M) (paper App. B, official ``multistep_dpm_solver_third_update``): ``ms`` and
    ``lams`` hold the three newest data predictions and their lambdas, newest first.

    ``D2 = (D1_0 - D1_1)/(r0 + r1)`` estimates ``h^2 x0''/2``, and the exact integral of the
    Taylor term is ``int_0^h tau^2/2 e^(tau-h) dtau x0'' = -h^2 phi3 x0''``, i.e. ``-2 alpha_t phi3 D2``.
    The official code and diffusers use ``-alpha_t phi3 D2`` (``d2_weight=1``, the default, for
    parity), which halves the second-derivative term and makes 3M formally second order;
    ``d2_weight=2`` is the exact third-order update (ODE only)."""
    m0, m1, m2 = ms
    l0, l1, l2 = lams
    h, h0, h1 = lam_t - l0, l0 - l1, l1 - l2
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    if noise is None:
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        return (s_t / s_s) * x - (a_t * phi1) * m0 + (a_t * phi2) * d1 - (d2_weight * a_t * phi3) * d2
    e2 = math.exp(-2.0 * h)
    return (
        (s_t / s_s * math.exp(-h)) * x
        + (a_t * (1.0 - e2)) * m0
        + (a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)) * d1
        + (a_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
        + (s_t * math.sqrt(1.0 - e2)) * noise
    )


def third_order_singlestep_update(
    x, m0, lam_s, m1, lam_1, m2, lam_2, lam_t, a_t, s_t, s_s, solver_type="midpoint"
):
    """Last stage of DPM-Solver++(3S) (paper Alg. 1 / official ``singlestep_dpm_solver_third_update``)
    with intermediate predictions ``m1`` at ``lam_1 = lam_s + r1 h`` and ``m2`` at ``lam_2 = lam_s + r2 h``.

    ``midpoint`` (official "dpmsolver"):
    ``x_t = (sigma_t/sigma_s) x - alpha_t phi1 m0 + (1/r2) alpha_t phi2 (m2 - m0)``;
    ``heun`` (official "taylor"): first and second divided differences from both intermediate points.
    """
    if solver_type == "midpoint":
        return second_order_update(x, m0, lam_s, m2, lam_2, lam_t, a_t, s_t, s_s, "heun")
    h = lam_t - lam_s
    r1, r2 = (lam_1 - lam_s) / h, (lam_2 - lam_s) / h
    d1_0, d1_1 = (m1 - m0) / r1, (m2 - m0) / r2
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    return (s_t / s_s) * x - (a_t * phi1) * m0 + (a_t * phi2) * d1 - (a_t * phi3) * d2


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
    """DPM-Solver++ as a diffusers scheduler (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
    Sampling of Diffusion Probabilistic Models", arXiv 2211.01095).

    Drop-in for ``DPMSolverMultistepScheduler``: the constructor takes its keywords with the same
    meaning (``solver_order``, ``solver_type``, ``algorithm_type``, ``use_karras_sigmas``,
    ``use_lu_lambdas``, ``use_exponential_sigmas``, ``timestep_spacing``, ``final_sigmas_type``,
    ``lower_order_final``, ``euler_at_final``, ``thresholding``, ``dynamic_thresholding_ratio``,
    ``sample_max_value``, ``prediction_type``, ``lambda_min_clipped``, ``use_flow_sigmas``,
    ``flow_shift``, ...), and with coinciding settings reproduces it step by step.

    fewstep additions:

    * ``method="singlestep"``: the official DPM-Solver-fast (paper Alg. 1): each interval of the
      outer grid gets an order from the fast schedule (:func:`singlestep_orders`), intermediate
      evaluations at ``r = 1/2`` (2S) or ``r = 1/3, 2/3`` (3S) of the interval in lambda.
      ``num_inference_steps`` counts model evaluations (NFE). ``timesteps`` then lists every
      evaluation point. (diffusers' ``DPMSolverSinglestepScheduler`` instead cycles orders over the
      plain grid.) SDE is multistep only.
    * ``timestep_spacing`` also takes ``"logsnr"``, ``"karras"`` (with ``karras_rho``),
      ``"exponential"`` and ``"time_power"`` (with ``timestep_power``; ``2`` is DPM-Solver's
      ``time_quadratic``, see :func:`fewstep.schedule.make_grid`); ``set_timesteps`` accepts
      ``sigmas=`` as well as ``timesteps=``.
    * ``solver_type`` also takes the official names ``"dpmsolver"`` (= midpoint) and ``"taylor"`` (= heun).
    * SD3/Flux FlowMatch configs switch on flow sigmas automatically in ``from_config``.
    * EDM / VE models (Karras et al. 2022): ``from_config`` of an ``EDMDPMSolverMultistepScheduler``
      (or ``EDMEulerScheduler``) config sets ``schedule_kind="edm"`` and reproduces diffusers' EDM
      scheduler: ``sigma_min``/``sigma_max`` (VE range), ``sigma_data`` (Table 1 preconditioning),
      ``sigma_schedule`` (``"karras"``, Eq. 5 with ``rho``, or ``"exponential"``),
      ``prediction_type`` ``"epsilon"`` (EDM's ``F``) or ``"v_prediction"``; ``scale_model_input``
      multiplies by ``c_in``, ``timesteps`` are ``c_noise = log(sigma)/4``. On EDM's VE schedule
      ``alpha = 1`` and ``lambda = -log(sigma)``, so the DPM-Solver++ updates (paper Eq. 9-10,
      Alg. 2) are the same functions as for VP. Deliberate differences from diffusers:
      ``init_noise_sigma = sigma_max`` (the paper's prior, Alg. 1) instead of
      ``sqrt(sigma_max^2 + 1)``, ``final_sigmas_type="sigma_min"`` ends on ``sigma_min`` without
      a zero-length last step (NaN in diffusers for heun 2M and 3M at >= 15 steps), a one-step
      exponential grid starts at ``sigma_max`` (diffusers: at ``sigma_min``), and SDE order 3
      works (diffusers' EDM scheduler has no SDE 3M).
    * ``round_timesteps=False`` keeps exact (float) model times on discrete schedules instead of
      rounding them to integers as diffusers does (the model then sees exactly the noise level the
      solver assumes on Karras / logSNR grids).
    * ``exact_third_order=True``: 3M with the exact weight of the second-derivative term (see
      :func:`third_order_multistep_update`; the official code and diffusers halve it, which makes
      their 3M second order). Measured on the exact Gaussian mixture: order ~3 instead of ~2.3.
    * ``check_finite``: raise on NaN/inf model outputs, naming the step.
    * ``renoise_eps`` in ``step`` (CFG++).

    Defaults follow diffusers (order 2 multistep, midpoint, ``final_sigmas_type="zero"``,
    ``lower_order_final=True`` meaning lower orders on the last steps when fewer than 15 steps).
    The official recommendation: order 2 multistep for guided sampling (the default), order 3 for
    unconditional or lightly guided sampling; ``timestep_spacing="logsnr"`` for small
    pixel-space models, time-uniform for latent models.
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
        self._setup()
        self._reset_history()

    # ---------------------------------------------------------------------- state
    def _reset_history(self) -> None:
        self._hist: list[tuple[float, torch.Tensor]] = []  # (lambda, x0), newest first
        self._stage_state = None  # singlestep: (interval id, x_s, [(lambda, x0), ...])

    def _needs_noise(self) -> bool:
        return self.config.algorithm_type == "sde-dpmsolver++"

    # ---------------------------------------------------------------------- singlestep planning
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None):
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
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu)

    def _plan(self, grid: Grid, num_inference_steps) -> Grid:
        if self.config.method != "singlestep":
            return grid
        k = len(grid.timesteps)
        orders = self._orders
        if orders is None:  # explicit outer grid: full order everywhere, first order into sigma = 0
            orders = [self.config.solver_order] * k
            if grid.sigmas[-1] == 0:
                orders[-1] = 1
        lam = grid.lambdas
        sched = self.schedule
        t_out, a_out, s_out, plan = [], [], [], []
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
                plan.append((j, stage, orders[j]))
        self._plan_steps = plan
        self._outer_end = {}  # interval -> index of the grid point that ends it
        idx = 0
        for j in range(k):
            idx += orders[j]
            self._outer_end[j] = idx
        return Grid(
            timesteps=np.asarray(t_out, dtype=np.float64),
            alphas=np.append(np.asarray(a_out), grid.alphas[-1]),
            sigmas=np.append(np.asarray(s_out), grid.sigmas[-1]),
        )

    # ---------------------------------------------------------------------- updates
    def _update(self, i, x, x0, noise):
        if self.config.method == "singlestep":
            return self._singlestep_update(i, x, x0)
        return self._multistep_update(i, x, x0, noise)

    def _point(self, i):
        return float(self._lambdas[i]), float(self._alphas[i]), float(self._sigmas[i])

    def _multistep_update(self, i, x, x0, noise):
        c = self.config
        n = len(self.timesteps)
        lam_s, _, s_s = self._point(i)
        lam_t, a_t, s_t = self._point(i + 1)
        self._hist.insert(0, (lam_s, x0))
        del self._hist[c.solver_order :]
        order = min(c.solver_order, len(self._hist))
        if i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"):
            order = 1
        elif i == n - 2 and c.lower_order_final and n < 15:
            order = min(order, 2)
        if not math.isfinite(lam_t):
            order = 1  # a step into sigma = 0 cannot use divided differences
        if order == 1:
            return first_order_update(x, x0, lam_s, lam_t, a_t, s_t, s_s, noise)
        if order == 2:
            lam_1, m1 = self._hist[1]
            return second_order_update(x, x0, lam_s, m1, lam_1, lam_t, a_t, s_t, s_s, self._solver_type, noise)
        ms = [m for _, m in self._hist[:3]]
        lams = [lam for lam, _ in self._hist[:3]]
        d2_weight = 2.0 if (c.exact_third_order and noise is None) else 1.0
        return third_order_multistep_update(x, ms, lams, lam_t, a_t, s_t, s_s, noise, d2_weight)

    def _singlestep_update(self, i, x, x0):
        j, stage, order = self._plan_steps[i]
        lam_i, _, _ = self._point(i)
        end = self._outer_end[j]
        lam_t, a_t, s_t = self._point(end)
        state = self._stage_state
        if stage == 0:
            self._stage_state = (j, x, [(lam_i, x0)], self._point(i))
            state = self._stage_state
        elif state is None or state[0] != j:
            # entered mid-interval (img2img begin index): first order to the next point
            lam_n, a_n, s_n = self._point(i + 1)
            return first_order_update(x, x0, lam_i, lam_n, a_n, s_n, float(self._sigmas[i]))
        else:
            state[2].append((lam_i, x0))
        _, x_s, preds, (lam_s, _, s_s) = state
        m0 = preds[0][1]
        if order == 1 or stage == 0:
            lam_n, a_n, s_n = self._point(i + 1)  # the next evaluation point (or the interval end)
            return first_order_update(x_s, m0, lam_s, lam_n, a_n, s_n, s_s)
        if order == 2:
            (lam_1, m1) = preds[1]
            return second_order_update(x_s, m0, lam_s, m1, lam_1, lam_t, a_t, s_t, s_s, self._solver_type)
        if stage == 1:  # 3S, second stage: to the second intermediate point with the Taylor 2nd order
            lam_n, a_n, s_n = self._point(i + 1)
            (lam_1, m1) = preds[1]
            return second_order_update(x_s, m0, lam_s, m1, lam_1, lam_n, a_n, s_n, s_s, "heun")
        (lam_1, m1), (lam_2, m2) = preds[1], preds[2]
        return third_order_singlestep_update(
            x_s, m0, lam_s, m1, lam_1, m2, lam_2, lam_t, a_t, s_t, s_s, self._solver_type
        )
