"""Momentum samplers (Wizadwongsa et al., ICLR 2024, "Diffusion Sampling with Momentum for
Mitigating Divergence Artifacts", arXiv 2307.11118): heavy ball (HB), generalized heavy ball
(GHVB) and Nesterov momentum on PLMS / Adams-Bashforth, and HB on DPM-Solver++(2M).

Adams-Bashforth bases (``base="plms"`` or ``"ab"``) solve the probability-flow ODE in DDIM
variables ``xbar = x / alpha``, ``sbar = sigma / alpha`` (paper Sec. 2): ``d xbar / d sbar = eps``,
with ``eps = (x - alpha x0) / sigma`` recomputed from the scheduler's (converted, thresholded) data
prediction ``x0``. These variables exist for every schedule fewstep supports: VP (``sbar`` =
diffusers' ``sqrt((1 - abar) / abar)``), flow matching (``alpha = 1 - s``, ``sigma = s``) and EDM
(``alpha = 1``, ``sbar = sigma``). A step with slope estimate ``e`` from grid point ``s`` to ``t``

    xbar_t = xbar_s + (sbar_t - sbar_s) e   i.e.   x_t = alpha_t x0 + sigma_t e + alpha_t sbar_s (eps - e)

is computed in the second form, which stays finite at the first point of a flow-matching grid
(``alpha_s = 0``, ``sbar_s = inf``; there ``e = eps``: every method starts with an Euler = DDIM step).

``base="plms"`` is the paper's PLMS (and diffusers' ``PNDMScheduler``): constant Adams-Bashforth
weights, i.e. Adams-Bashforth in the step *index*, order ``r`` on grids uniform in ``sbar`` and
at most 2 elsewhere. ``base="ab"`` (fewstep's extension) takes the weights from the actual ``sbar``
of the grid (variable-step Adams-Bashforth, :func:`adams_bashforth_weights`): the same method on
uniform grids, order ``r`` on every grid.

``base="dpmpp"``: HB on DPM-Solver++(2M) in ``lambda = log(alpha / sigma)`` with data predictions,
as in the official ADM code: the velocity averages ``m0 + D1 / 2`` and replaces it in
``x_t = (sigma_t / sigma_s) x - alpha_t expm1(-h) vel``.

GHVB weights: see :func:`ghvb_weights` and ``docs/momentum.md``.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .dpmpp import multistep_order
from .dpmpp_update import Point, first_order
from .scheduler import FewstepScheduler

METHODS = ("ghvb", "hb", "nesterov")
BASES = ("plms", "ab", "dpmpp")
MAX_ORDER = {"plms": 5, "ab": 5, "dpmpp": 2}
DEFAULT_ORDER = {"plms": 4, "ab": 4, "dpmpp": 2}
DEFAULT_BETA = 0.8  # the official default (ADM DPM-Solver++ ``momentum=0.8``; GHVB 3.8 on DiT)


def adams_bashforth_weights(nodes) -> np.ndarray:
    """Adams-Bashforth weights for nodes ``u_j`` (newest first, in units of the step, the step
    running from ``u = 0`` to ``u = 1``): ``sum_j b_j u_j^k = 1 / (k + 1)`` for ``k < len(nodes)``,
    i.e. the mean over the step of the polynomial through ``(u_j, f_j)``. Constant-step (PLMS)
    nodes ``0, -1, -2, ...`` give (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24, ..."""
    u = np.asarray(nodes, dtype=np.float64)
    k = np.arange(len(u))
    return np.linalg.solve(u[None, :] ** k[:, None], 1.0 / (k + 1.0))


def ghvb_weights(ab: np.ndarray, beta: float) -> np.ndarray:
    """GHVB's weights ``a_j`` of the velocities ``v_{n+1}, v_n, ...`` (paper Algorithm 2) from the
    Adams-Bashforth weights ``ab`` of its order ``c``.

    Writing ``f_m = (v_{m+1} - (1 - beta) v_m) / beta`` turns Adams-Bashforth on ``f`` into ``c + 1``
    velocity terms; the oldest, ``v_{n+1-c}``, is replaced by its polynomial extrapolation from
    the ``c`` newer ones (``D^c v_{n+1} = 0``, ``D`` the backward difference), which changes the
    step by ``O(h^c) * h``: order ``c`` (Theorem 2). With constant-step ``ab`` these are the paper's
    coefficients (c = 3: ``(18 + 5b, -(24 - 8b), 6 - b) / 12b``); ``beta = 1`` returns ``ab``."""
    c = len(ab)
    b = float(beta)
    w = np.empty(c + 1)
    w[0] = ab[0] / b
    w[1:c] = (ab[1:] - (1.0 - b) * ab[:-1]) / b
    w[c] = -(1.0 - b) * ab[-1] / b
    j = np.arange(c)
    binom = np.array([math.comb(c, int(i)) for i in j], dtype=np.float64)
    return w[:c] - w[c] * (-1.0) ** (c + j) * binom


@lru_cache(maxsize=None)
def _constant_weights(order: int, beta: float, ghvb: bool) -> tuple[float, ...]:
    ab = adams_bashforth_weights(-np.arange(order, dtype=np.float64))
    return tuple(ghvb_weights(ab, beta) if ghvb else ab)


def _combine(weights, history):
    """``sum_i weights[i] * history[i]`` (newest first)."""
    out = weights[0] * history[0]
    for w, h in zip(weights[1:], history[1:]):
        out = out + w * h
    return out


def resolve_momentum(method: str, momentum_number, base, beta) -> tuple[str, int, float]:
    """Validate the momentum keywords and return ``(base, order, beta)``.

    ``momentum_number = m`` packs the order and the damping as in the paper: ``order = ceil(m)``,
    ``beta = m - order + 1`` (integer ``m``: ``beta = 1``, the plain base method); ``beta`` may
    instead be given with an integer (or no) ``momentum_number``. Defaults: ``base="plms"``, order 4
    for Adams-Bashforth bases and 2 for DPM-Solver++, ``beta = 0.8``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(map(repr, METHODS))}")
    if base is None:
        base = "plms"
    if base not in BASES:
        raise ValueError(f"base={base!r} is not supported; allowed: {', '.join(map(repr, BASES))}")
    if method != "hb" and base == "dpmpp":
        raise ValueError(f"base={base!r} is not supported with method={method!r}; allowed: 'plms', 'ab' "
                         "(GHVB and Nesterov momentum are built on Adams-Bashforth)")
    top = MAX_ORDER[base]
    if beta is not None:
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 < float(beta) <= 1.0:
            raise ValueError(f"beta={beta!r} is not supported; allowed: a number in (0, 1] (1 = no momentum)")
        beta = float(beta)
    if momentum_number is None:
        return base, DEFAULT_ORDER[base], DEFAULT_BETA if beta is None else beta
    m = momentum_number
    if isinstance(m, bool) or not isinstance(m, numbers.Real) or not (math.isfinite(m) and 0.0 < m <= top):
        raise ValueError(
            f"momentum_number={m!r} is not supported with base={base!r}; allowed: a number in (0, {top}] "
            f"(order ceil(m), beta = the fractional part; integer m = plain {base} of order m)")
    order = math.ceil(round(float(m), 12))
    frac = round(float(m) - (order - 1), 12)
    if frac == 1.0:  # integer m: beta from `beta` or 1
        return base, order, 1.0 if beta is None else beta
    if beta is not None and abs(beta - frac) > 1e-9:
        raise ValueError(
            f"momentum_number={m!r} (order {order}, beta {frac:g}) contradicts beta={beta!r}; give beta once: "
            f"momentum_number={order} with beta={beta!r}, or momentum_number={m!r} alone")
    return base, order, frac


class MomentumScheduler(FewstepScheduler):
    """Momentum sampling (Wizadwongsa et al., ICLR 2024) as a diffusers scheduler.

    Keywords ``method``, ``momentum_number``, ``base``, ``beta`` (:func:`resolve_momentum`: the
    momentum number is ``m = order - 1 + beta``, so GHVB 3.8 is order 4 with ``beta = 0.8``):

    * ``method="ghvb"`` (default): generalized heavy ball, paper Algorithm 2:
      ``v_{n+1} = (1 - beta) v_n + beta eps_n``, slope ``e = sum_j a_j v_{n+1-j}`` with the
      :func:`ghvb_weights` of order ``c = min(r, n + 1)``. Order ``r`` (Theorem 2); integer ``m``
      is Adams-Bashforth / PLMS of order ``m``; ``beta -> 0`` tends to order ``r - 1``. ``m`` in (0, 5].
    * ``method="hb"``: Polyak's heavy ball on a multistep method (paper Eq. 14), first order for
      any ``beta < 1`` (Theorem 1). Adams-Bashforth bases: ``v_{n+1} = (1 - beta) v_n + beta
      AB_c(eps)``, ``e = v_{n+1}``, orders 1-5 (``momentum_number=4, beta=0.8`` = 3.8 is the
      paper's "PLMS4+HB 0.8"). ``base="dpmpp"``: HB on DPM-Solver++(2M) (official ADM code): the
      velocity averages ``m0 + D1/2``; orders 1-2 (default 2). DPM-Solver++'s first-order final
      steps (``lower_order_final``, ``euler_at_final``, the step into ``sigma = 0``) use the plain
      data prediction, as the official code does.
    * ``method="nesterov"``: Nesterov momentum on Adams-Bashforth (paper App. E, official
      ``PLMSWithNTScheduler``): ``v`` as for HB, ``e = (1 - beta) v_{n+1} + beta AB_c(eps)``.

    ``base``: ``"plms"`` (default; the paper's constant weights), ``"ab"`` (variable-step weights
    from the grid's ``sbar``; fewstep's extension, see the module docstring) or ``"dpmpp"`` (HB only).

    Velocities start at the first step's own value, so the first step is DDIM (Adams-Bashforth
    bases) or DPM-Solver++(1) for every ``beta``; histories reset in ``set_timesteps``.
    ``lower_order_final`` and ``euler_at_final`` apply to ``base="dpmpp"`` only: the paper's
    PLMS methods keep their order to the end (DDIM variables have no singularity at ``sigma = 0``).

    Everything else is :class:`~fewstep.samplers.scheduler.FewstepScheduler`: diffusers keywords
    and ``from_config`` of SD / SDXL / SD3 (flow matching) / EDM configs, every grid, prediction
    types, thresholding, img2img begin index, ``save_pretrained``, and CFG++ renoising (the
    restarted state ``alpha x0 + sigma eps_u`` enters the update like any state: Adams-Bashforth
    histories hold ``eps_u``, DPM-Solver++ histories the guided ``x0``). ``from_config`` drops a
    ``method`` of another scheduler (DPMSolverPPScheduler's ``"multistep"``), and a ``method``
    passed that differs from the source config's drops the source's ``momentum_number``, ``base``
    and ``beta``. Resolved values: :attr:`momentum_base`, :attr:`momentum_order`, :attr:`momentum_beta`.
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
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
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
        karras_rho: float = 7.0,
        timestep_power: float = 2.0,
        round_timesteps: bool = True,
        check_finite: bool = True,
        schedule_kind: str | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float = 0.5,
        sigma_schedule: str | None = None,
        rho: float | None = None,
        method: str = "ghvb",
        momentum_number: float | None = None,
        base: str | None = None,
        beta: float | None = None,
    ):
        self.momentum_base, self.momentum_order, self.momentum_beta = resolve_momentum(
            method, momentum_number, base, beta)
        self._setup()
        self._reset_history()

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """:meth:`FewstepScheduler.from_config`, plus: a ``method`` in ``config`` that is not a
        momentum method (DPMSolverPPScheduler's ``"multistep"``) is dropped, and when ``kwargs``
        names a different ``method`` than ``config``, the source's momentum keywords go with it; an
        explicit ``momentum_number`` replaces the source's ``beta`` too (it carries its own beta)."""
        if isinstance(config, dict) and "method" in config:
            src = config.get("method")
            if src not in METHODS or ("method" in kwargs and kwargs["method"] != src):
                config = {k: v for k, v in config.items() if k not in ("method", "momentum_number", "base", "beta")}
        if isinstance(config, dict) and "momentum_number" in kwargs and "beta" not in kwargs:
            config = {k: v for k, v in config.items() if k != "beta"}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ---------------------------------------------------------------------- state
    def _reset_history(self) -> None:
        # Adams-Bashforth bases: (sbar of the step's start, eps or velocity), newest first
        self._hist: list[tuple[float, torch.Tensor]] = []
        self._x0_hist: list[tuple[float, torch.Tensor]] = []  # dpmpp: (lambda, x0), newest first
        self._vel: torch.Tensor | None = None

    def _momentum(self, target: torch.Tensor) -> torch.Tensor:
        """``v <- (1 - beta) v + beta target``, starting at ``v = target``."""
        b = self.momentum_beta
        self._vel = target if self._vel is None or b == 1.0 else (1.0 - b) * self._vel + b * target
        return self._vel

    # ---------------------------------------------------------------------- updates
    def _update(self, i, x, x0, noise):
        if self.momentum_base == "dpmpp":
            return self._hb_dpmpp_update(i, x, x0)
        a_s, s_s = float(self._alphas[i]), float(self._sigmas[i])
        a_t, s_t = float(self._alphas[i + 1]), float(self._sigmas[i + 1])
        eps = (x - a_s * x0) / s_s
        e = self._slope(i, eps)
        x_t = a_t * x0 + s_t * e
        if a_s > 0.0:  # alpha_s = 0 only at the first point of a flow grid, where e = eps
            x_t = x_t + (a_t * s_s / a_s) * (eps - e)
        return x_t

    def _sbar(self, i: int) -> float:
        a = float(self._alphas[i])
        return float(self._sigmas[i]) / a if a > 0.0 else math.inf

    def _weights(self, i: int, c: int, ghvb: bool) -> tuple[float, ...] | np.ndarray:
        """Adams-Bashforth (or, with ``ghvb``, GHVB velocity) weights of order ``c`` for step ``i``."""
        if self.momentum_base == "plms" or c == 1:
            return _constant_weights(c, self.momentum_beta if ghvb else 1.0, ghvb)
        s0, step = self._sbar(i), self._sbar(i + 1) - self._sbar(i)
        ab = adams_bashforth_weights([(sb - s0) / step for sb, _ in self._hist[:c]])
        return ghvb_weights(ab, self.momentum_beta) if ghvb else ab

    def _slope(self, i: int, eps: torch.Tensor) -> torch.Tensor:
        """The slope estimate ``e`` of ``d xbar / d sbar`` for step ``i`` (class docstring)."""
        method, hist = self.config.method, self._hist
        ghvb = method == "ghvb"
        hist.insert(0, (self._sbar(i), self._momentum(eps) if ghvb else eps))
        del hist[self.momentum_order:]
        c = len(hist)
        if self.momentum_base == "ab":  # interpolate through finite sbar only, on a step of nonzero length
            c = next((j for j, (sb, _) in enumerate(hist) if not math.isfinite(sb)), c)
            c = c if self._sbar(i + 1) != self._sbar(i) else 1
        combo = _combine(self._weights(i, max(c, 1), ghvb), [h for _, h in hist])
        if ghvb:
            return combo
        v = self._momentum(combo)
        b = self.momentum_beta
        return v if method == "hb" or b == 1.0 else (1.0 - b) * v + b * combo

    def _hb_dpmpp_update(self, i, x, x0):
        """HB on DPM-Solver++(2M), midpoint form (official ADM code), with the order rules of
        :class:`~fewstep.samplers.DPMSolverPPScheduler`'s multistep solver."""
        n = len(self.timesteps)
        s = Point(float(self._lambdas[i]), float(self._alphas[i]), float(self._sigmas[i]))
        t = Point(float(self._lambdas[i + 1]), float(self._alphas[i + 1]), float(self._sigmas[i + 1]))
        self._x0_hist.insert(0, (s.lam, x0))
        del self._x0_hist[2:]
        order = min(self.momentum_order, len(self._x0_hist))
        reduced = multistep_order(2, i, n, self.config, t.lam) == 1
        if reduced and self._vel is not None:  # a first-order final step: no momentum (official code)
            return first_order(x, s, t, x0)
        diff = x0
        if order == 2 and not reduced:
            lam_1, m1 = self._x0_hist[1]
            diff = x0 + (0.5 * (t.lam - s.lam) / (s.lam - lam_1)) * (x0 - m1)  # m0 + D1 / 2
        return first_order(x, s, t, self._momentum(diff))
