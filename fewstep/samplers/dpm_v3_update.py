"""The DPM-Solver-v3 update (Zheng, Lu, Chen, Zhu, NeurIPS 2023, arXiv 2310.13268) as one function
over point records, with the coefficient source passed in.

With ``y = x / alpha``, ``f = (sigma eps - l x) / alpha`` and the empirical model statistics
``l, s, b`` (:mod:`fewstep.samplers.ems`), the exact solution from ``lambda_s`` to ``lambda_t`` is
(paper Eq. 9) ``y_t = e^{L_s - L_t} y_s - e^{-L_t - S_s} int e^{L+S} g dlambda - e^{-L_t}(C_t - C_s - B_s (I_t - I_s))``
with ``g_lambda = e^{S_s - S_lambda} f_lambda - e^{S_s} (B_lambda - B_s)`` (paper Eq. 8). Taylor-expanding
``g`` at ``lambda_s`` (paper Eq. 13)::

    y_t ~ A y_s - c_0 g_s - const - sum_{k>=1} c_k g_s^(k),   c_k = e^{L_s - L_t} E_k(s, t)

with ``g^(k)`` from earlier points (:func:`derivative_estimates`, paper Sec. 3.2-3.3). Two coefficient
sources give ``A``, ``c_k``, ``const``, ``l`` and the ``g`` transform: :class:`EMSCoefficients` (the
integrals of measured statistics) and :class:`ClosedFormCoefficients` (``l = 1, s = 0, b = 0``:
``g = f = -x0``, ``A = e^{-h}/alpha_s``, ``c_k = psi_k(h)``, ``const = 0`` -- DPM-Solver++'s multistep
update, paper App. A.2). See docs/samplers-reference.md ("DPM-Solver-v3").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .dpmpp_update import Point
from .ems import EMS


@dataclass
class V3Point(Point):
    """A DPM-Solver-v3 point: the noise level, the scheduler's grid ``index`` (history continuity),
    the EMS grid index ``k`` (None for the closed form), the state ``x`` there (after correction) and
    ``f = (sigma eps - l x) / alpha`` (paper Eq. 8)."""

    index: int = -1
    k: int | None = None
    x: torch.Tensor | None = None
    f: torch.Tensor | None = None


def psi(h: float, order: int) -> list[float]:
    """``psi_k(h) = e^{-h} int_0^h e^u u^k / k! du`` for ``k = 0..order-1``
    (recursion ``psi_k = h^k / k! - psi_{k-1}``, ``psi_0 = -expm1(-h)``)."""
    out = [-math.expm1(-h)]
    for k in range(1, order):
        out.append(h**k / math.factorial(k) - out[-1])
    return out


def derivative_estimates(lams: list[float], gs: list[torch.Tensor], pseudo: bool) -> list[torch.Tensor]:
    """``[g^(1), ..., g^(n)]`` at ``lams[0]`` from the values ``gs`` at ``lams`` (``n = len - 1``).

    ``pseudo=False``: the interpolating polynomial through all points (Vandermonde solve,
    ``g_j - g_0 = sum_k g^(k) d_j^k / k!`` with ``d_j = lams[j] - lams[0]``; paper Eq. 14).
    ``pseudo=True``: divided differences ``D^(k)_i = (D^(k-1)_i - D^(k-1)_{i+1}) / (lams[i] - lams[i+k])``
    and ``g^(k) = k! D^(k)_0`` (paper Sec. 3.3, "pseudo-order")."""
    n = len(lams) - 1
    if n == 0:
        return []
    if pseudo:
        table = [list(gs)]
        for k in range(1, n + 1):
            prev = table[-1]
            table.append([(prev[i] - prev[i + 1]) / (lams[i] - lams[i + k]) for i in range(n - k + 1)])
        return [table[k][0] * math.factorial(k) for k in range(1, n + 1)]
    d = np.asarray(lams[1:], dtype=np.float64) - lams[0]
    vinv = np.linalg.inv(np.stack([d**k for k in range(1, n + 1)], axis=1))  # rows j, cols k
    diffs = [g - gs[0] for g in gs[1:]]
    out = []
    for k in range(n):
        acc = sum(float(vinv[k, j]) * diffs[j] for j in range(n))
        out.append(acc * math.factorial(k + 1))
    return out


class ClosedFormCoefficients:
    """Degenerate statistics ``l = 1, s = 0, b = 0`` (paper App. A.2): python-float coefficients."""

    def check_shape(self, sample_shape) -> None:
        """Any sample shape works."""

    def l(self, p: V3Point, ref: torch.Tensor):  # noqa: E743 (paper notation)
        """``l = 1``."""
        return 1.0

    def g(self, p: V3Point, s: V3Point) -> torch.Tensor:
        """``g_p = f_p`` (``S = B = 0``)."""
        return p.f

    def A(self, s: V3Point, t: V3Point, ref: torch.Tensor):
        """``e^{-h} / alpha_s`` (acts on ``x_s``; ``h = lambda_t - lambda_s``)."""
        return math.exp(-(t.lam - s.lam)) / s.alpha

    def c(self, s: V3Point, t: V3Point, k: int, ref: torch.Tensor):
        """``psi_k(h)``."""
        return psi(t.lam - s.lam, k + 1)[k]

    def constant(self, s: V3Point, t: V3Point, ref: torch.Tensor):
        """``0`` (no ``b``)."""
        return 0.0


class EMSCoefficients:
    """Coefficients from the integrals of measured statistics (paper Eq. 9-13; :class:`EMS`),
    per dimension, relative to the step start so nothing overflows."""

    def __init__(self, ems: EMS):
        self.ems = ems

    def check_shape(self, sample_shape) -> None:
        """``ValueError`` unless one sample has the EMS shape."""
        self.ems.check_shape(tuple(sample_shape))

    @staticmethod
    def _tensor(arr, ref: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(arr), dtype=ref.dtype, device=ref.device)

    def l(self, p: V3Point, ref: torch.Tensor):  # noqa: E743 (paper notation)
        """``l`` at ``p`` (paper Eq. 7)."""
        return self._tensor(self.ems.l[p.k], ref)

    def g(self, p: V3Point, s: V3Point) -> torch.Tensor:
        """``g_p = e^{S_s - S_p} f_p - e^{S_s} (B_p - B_s)`` (paper Eq. 8, relative to ``s``)."""
        e, ks, kp = self.ems, s.k, p.k
        if ks == kp:
            return p.f
        f = p.f
        return self._tensor(np.exp(e.S[ks] - e.S[kp]), f) * f - self._tensor(np.exp(e.S[ks]) * (e.B[kp] - e.B[ks]), f)

    def A(self, s: V3Point, t: V3Point, ref: torch.Tensor):
        """``e^{L_s - L_t} / alpha_s``."""
        e = self.ems
        return self._tensor(np.exp(e.L[s.k] - e.L[t.k]) / s.alpha, ref)

    def c(self, s: V3Point, t: V3Point, k: int, ref: torch.Tensor):
        """``e^{L_s - L_t} E_k(s, t)`` (:meth:`EMS.exp_coefficient`)."""
        e = self.ems
        return self._tensor(np.exp(e.L[s.k] - e.L[t.k]) * e.exp_coefficient(s.k, t.k, k), ref)

    def constant(self, s: V3Point, t: V3Point, ref: torch.Tensor):
        """``e^{L_s + S_s - L_t}`` times the ``B`` integral (:meth:`EMS.b_coefficient`)."""
        e = self.ems
        return self._tensor(np.exp(e.L[s.k] + e.S[s.k] - e.L[t.k]) * e.b_coefficient(s.k, t.k), ref)


def v3_update(x_s: torch.Tensor, points: list[V3Point], target: V3Point, order: int, coefficients,
              pseudo: bool = False) -> torch.Tensor:
    """Move ``x_s`` (at ``points[0]``) to ``target`` with the order-``order`` expansion of ``g``
    through ``points[:order]`` (newest first; each with ``f`` set), paper Eq. 13:
    ``x_t = alpha_t (A x_s - c_0 g_s - const - sum_k c_k g^(k))``. The corrector (paper Alg. 2) is
    the same call with the freshly evaluated point among ``points`` and it as ``target``."""
    ps = points[:order]
    s = ps[0]
    gs = [coefficients.g(p, s) for p in ps]
    derivs = derivative_estimates([p.lam for p in ps], gs, pseudo) if order > 1 else []
    src = coefficients
    y = src.A(s, target, x_s) * x_s - src.c(s, target, 0, x_s) * gs[0] - src.constant(s, target, x_s)
    for k, d in enumerate(derivs, start=1):
        y = y - src.c(s, target, k, x_s) * d
    return target.alpha * y
