"""DPM-Solver++ updates (Lu et al. 2022, arXiv 2211.01095) as pure functions over grid points.

Data-prediction form: with ``h = lambda_t - lambda_s`` the exact solution of the probability-flow
ODE is (paper Eq. 9) ``x_t = (sigma_t/sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0 dlambda``;
the solvers Taylor-expand ``x0`` in ``lambda`` (``phi1 = expm1(-h)``). SDE-DPM-Solver++ (paper
Sec. 5 / App. B) adds the exact Gaussian transition of the VP SDE.

Each function moves ``x`` from point ``s`` to point ``t`` (:class:`Point`: float64 ``lam``, ``alpha``,
``sigma``) given data predictions ``preds`` = ``[(lambda, x0), ...]``, newest first, ``preds[0]``
at ``s``. They are independent of any scheduler state, so a sampler can choose the order, the
points and the history per step. States are tensors; coefficients are python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

Preds = Sequence[tuple[float, torch.Tensor]]


@dataclass
class Point:
    """One noise level: half log-SNR ``lam = log(alpha/sigma)``, ``alpha`` and ``sigma`` (float64
    python floats; ``lam = inf`` at ``sigma = 0``)."""

    lam: float
    alpha: float
    sigma: float


def _sde_base(x, s: Point, t: Point, m0, noise, h):
    """``(sigma_t/sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) m0 + sigma_t sqrt(1 - e^{-2h}) z`` and ``e^{-2h}``."""
    a_t, s_t, s_s = t.alpha, t.sigma, s.sigma
    e2 = math.exp(-2.0 * h)
    return (s_t / s_s * math.exp(-h)) * x + (a_t * (1.0 - e2)) * m0 + (s_t * math.sqrt(1.0 - e2)) * noise, e2


def first_order(x, s: Point, t: Point, m0, noise=None):
    """DPM-Solver++(1) = DDIM (paper Eq. 10 with k = 1): ``x_t = (sigma_t/sigma_s) x - alpha_t
    expm1(-h) m0``; with ``noise``, SDE-DPM-Solver++1. ``t.lam`` may be ``inf`` (returns ``alpha_t m0``)."""
    h = t.lam - s.lam
    if noise is None:
        return (t.sigma / s.sigma) * x - (t.alpha * math.expm1(-h)) * m0
    return _sde_base(x, s, t, m0, noise, h)[0]


def second_order(x, s: Point, t: Point, preds: Preds, solver_type: str = "midpoint", noise=None):
    """Second-order DPM-Solver++ with ``preds[1] = (lam_1, m1)`` behind ``s`` (multistep 2M, paper
    Alg. 2) or ahead of it (singlestep 2S, Alg. 1): ``D1 = (m1 - m0) / r``, ``r = (lam_1 - lam_s) / h``;
    ``midpoint``: ``x_t = (sigma_t/sigma_s) x - alpha_t phi1 m0 - 0.5 alpha_t phi1 D1``; ``heun``
    (official "taylor"): ``... + alpha_t (phi1/h + 1) D1``."""
    (_, m0), (lam_1, m1) = preds[0], preds[1]
    h = t.lam - s.lam
    d1 = (m1 - m0) * (h / (lam_1 - s.lam))
    if noise is None:
        phi1 = math.expm1(-h)
        x_t = (t.sigma / s.sigma) * x - (t.alpha * phi1) * m0
        if solver_type == "midpoint":
            return x_t - (0.5 * t.alpha * phi1) * d1
        return x_t + (t.alpha * (phi1 / h + 1.0)) * d1
    x_t, e2 = _sde_base(x, s, t, m0, noise, h)
    if solver_type == "midpoint":
        return x_t + (0.5 * t.alpha * (1.0 - e2)) * d1
    return x_t + (t.alpha * ((1.0 - e2) / (-2.0 * h) + 1.0)) * d1


def third_order_multistep(x, s: Point, t: Point, preds: Preds, noise=None, d2_weight: float = 1.0):
    """DPM-Solver++(3M) (paper App. B, official ``multistep_dpm_solver_third_update``) from the three
    newest predictions. ``D2 = (D1_0 - D1_1)/(r0 + r1)`` estimates ``h^2 x0''/2``; the exact Taylor
    weight of it is ``-2 alpha_t phi3``. The official code and diffusers use ``-alpha_t phi3``
    (``d2_weight=1``, the default, for parity: formally second order); ``d2_weight=2`` is the exact
    third-order update (ODE only)."""
    (l0, m0), (l1, m1), (l2, m2) = preds[0], preds[1], preds[2]
    a_t, s_t, s_s = t.alpha, t.sigma, s.sigma
    h, h0, h1 = t.lam - l0, l0 - l1, l1 - l2
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


def third_order_singlestep(x, s: Point, t: Point, preds: Preds, solver_type: str = "midpoint"):
    """Last stage of DPM-Solver++(3S) (paper Alg. 1, official ``singlestep_dpm_solver_third_update``)
    with intermediate predictions ``preds[1]`` at ``lam_s + r1 h`` and ``preds[2]`` at ``lam_s + r2 h``.
    ``midpoint`` (official "dpmsolver"): ``x_t = (sigma_t/sigma_s) x - alpha_t phi1 m0 + (1/r2)
    alpha_t phi2 (m2 - m0)``; ``heun`` (official "taylor"): both divided differences."""
    if solver_type == "midpoint":
        return second_order(x, s, t, [preds[0], preds[2]], "heun")
    (_, m0), (lam_1, m1), (lam_2, m2) = preds[0], preds[1], preds[2]
    h = t.lam - s.lam
    r1, r2 = (lam_1 - s.lam) / h, (lam_2 - s.lam) / h
    d1_0, d1_1 = (m1 - m0) / r1, (m2 - m0) / r2
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    return (t.sigma / s.sigma) * x - (t.alpha * phi1) * m0 + (t.alpha * phi2) * d1 - (t.alpha * phi3) * d2


def multistep_update(x, s: Point, t: Point, preds: Preds, order: int, solver_type: str = "midpoint", noise=None,
                     d2_weight: float = 1.0):
    """One multistep DPM-Solver++ step of ``order`` 1-3 (uses ``preds[:order]``; paper Alg. 2/App. B)."""
    if order == 1:
        return first_order(x, s, t, preds[0][1], noise)
    if order == 2:
        return second_order(x, s, t, preds, solver_type, noise)
    return third_order_multistep(x, s, t, preds, noise, d2_weight)
