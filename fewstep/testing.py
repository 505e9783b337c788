"""An exact diffusion model of a Gaussian mixture, and high-accuracy reference ODE solutions.

For data ``x0 ~ sum_k w_k N(mu_k, diag(v_k))`` and ``x_t = alpha x0 + sigma eps`` every quantity a
diffusion model learns has a closed form. In VE coordinates ``y = x_t / alpha`` with
``s = sigma / alpha = exp(-lambda)``::

    p(y | s) = sum_k w_k N(y; mu_k, v_k + s^2)
    E[x0 | y] = sum_k g_k(y) (mu_k + v_k / (v_k + s^2) (y - mu_k)),   g_k = posterior responsibilities
    eps(y)    = (y - E[x0 | y]) / s = sum_k g_k(y) s (y - mu_k) / (v_k + s^2)

and the probability-flow ODE is ``dy/ds = eps(y, s)`` (Song et al. 2021; Karras et al. 2022, Eq. 4
with ``sigma(t) = t``), which :func:`reference_solve` integrates in float64 with an adaptive
8th-order Runge-Kutta method (scipy DOP853) down to ``s = 0`` or any ``s_end``.

Components are assigned to classes for a class-conditional model; ``c = None`` (or the null class
``-1``) is the unconditional mixture over all components.

:func:`mixture_ems` gives DPM-Solver-v3's empirical model statistics of a mixture from the closed-form
Jacobian diagonal and automatic differentiation in ``lambda`` (an independent reference for
:func:`fewstep.samplers.compute_ems`, which uses JVPs, Hutchinson probes and finite differences).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .schedule import NoiseSchedule, from_x0_eps


@contextlib.contextmanager
def one_thread():
    """Run the block with ``torch.set_num_threads(1)``, restoring the previous count after. Small
    models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP spin-waiting
    makes 2-thread runs of them many times slower; tests and benchmarks use this."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class GaussianMixture:
    """A diagonal Gaussian mixture in ``dim`` dimensions: ``means`` (K, D), ``variances`` (K, D),
    ``weights`` (K,) summing to 1, ``classes`` (K,) the class label of each component."""

    means: torch.Tensor
    variances: torch.Tensor
    weights: torch.Tensor
    classes: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.classes.max().item()) + 1

    def _component_mask(self, c, batch: int) -> torch.Tensor:
        """(B, K) boolean mask of the components allowed for each sample's condition."""
        k = self.means.shape[0]
        if c is None:
            return torch.ones(batch, k, dtype=torch.bool)
        c = torch.as_tensor(c).reshape(-1)
        if c.numel() == 1:
            c = c.expand(batch)
        if c.numel() != batch:
            raise ValueError(f"got {c.numel()} class labels for a batch of {batch}")
        mask = c[:, None] == self.classes[None, :]
        mask |= (c < 0)[:, None]  # null class -> unconditional
        if not bool(mask.any(dim=1).all()):
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}] or -1, got {c.tolist()}")
        return mask

    def _posterior(self, y: torch.Tensor, s, c):
        """Responsibilities ``g`` (B, K, 1) of the components for ``y = x0 + s * eps``, with
        ``diff = y - mu_k`` (B, K, D), ``var = v_k + s^2`` and ``s`` shaped (B|1, 1, 1); float64."""
        y = y.double()
        s_t = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1, 1)
        mu, v = self.means.double()[None], self.variances.double()[None]  # (1, K, D)
        var = v + s_t**2
        diff = y[:, None, :] - mu
        logp = -0.5 * ((diff**2) / var + torch.log(2 * math.pi * var)).sum(-1) + torch.log(self.weights.double())[None]
        logp = logp.masked_fill(~self._component_mask(c, y.shape[0]), -math.inf)
        return torch.softmax(logp, dim=1)[:, :, None], diff, var, s_t

    def denoise_ve(self, y: torch.Tensor, s, c=None) -> torch.Tensor:
        """``E[x0 | y]`` for ``y = x0 + s * eps`` (float64; ``y`` of shape (B, D); ``s`` scalar or (B,))."""
        g, diff, var, _ = self._posterior(y, s, c)
        return (g * (self.means.double()[None] + self.variances.double()[None] / var * diff)).sum(1)

    def eps_ve(self, y: torch.Tensor, s, c=None) -> torch.Tensor:
        """``eps(y, s) = sum_k g_k s (y - mu_k) / (v_k + s^2)`` (finite at ``s = 0``; float64)."""
        g, diff, var, s_t = self._posterior(y, s, c)
        return (g * s_t * diff / var).sum(1)

    def prior_mean(self, c=None, batch: int = 1) -> torch.Tensor:
        """``E[x0]`` per sample (B, D) under the (class-restricted) mixture (float64)."""
        w = self.weights.double()[None].expand(batch, -1) * self._component_mask(c, batch)
        return (w / w.sum(1, keepdim=True)) @ self.means.double()

    def sample(self, n: int, c=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` exact samples ``x0`` (float64, (n, D)), optionally of class ``c``."""
        mask = self._component_mask(c, n)
        w = self.weights.double()[None].expand(n, -1) * mask
        k = torch.multinomial(w / w.sum(1, keepdim=True), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means.double()[k] + self.variances.double()[k].sqrt() * z


def make_gaussian_mixture(
    dim: int = 16, num_components: int = 6, num_classes: int = 3, seed: int = 0, var_range=(0.002, 0.05)
) -> GaussianMixture:
    """A random mixture with data roughly in ``[-1, 1]``: means uniform in ``[-0.8, 0.8]``,
    per-dimension variances log-uniform in ``var_range`` (small variances make the ODE stiff near
    the data, which separates good solvers from poor ones), weights Dirichlet(5), components
    assigned to classes round-robin."""
    if num_components < num_classes:
        raise ValueError("need at least one component per class")
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(num_components, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    lo, hi = math.log(var_range[0]), math.log(var_range[1])
    variances = torch.exp(lo + (hi - lo) * torch.rand(num_components, dim, generator=g, dtype=torch.float64))
    # Dirichlet(5) weights from the seed alone (torch's Gamma sampler would use the global RNG)
    w = torch.from_numpy(np.random.default_rng(seed).gamma(5.0, size=num_components))
    classes = torch.arange(num_components) % num_classes
    return GaussianMixture(means, variances, w / w.sum(), classes)


class GaussianMixtureModel:
    """The exact denoiser of a :class:`GaussianMixture` under a noise schedule, with the fewstep
    call convention ``model(x, t, c) -> raw output`` of type ``prediction_type``.

    ``x`` may have any shape ``(B, ...)`` whose trailing dims flatten to the mixture's ``dim``;
    ``t`` is the training-scale time (scalar or (B,)) read through ``schedule``; ``c`` a class
    label per sample, a single label, ``None`` or ``-1`` (unconditional). Output is returned in
    ``x``'s dtype. ``nfe`` counts calls (one per batch pass).
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        self.mixture = mixture
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t, c=None) -> torch.Tensor:
        self.nfe += 1
        b = x.shape[0]
        xf = x.reshape(b, -1).double()
        if xf.shape[1] != self.mixture.dim:
            raise ValueError(f"x has {xf.shape[1]} features per sample, the mixture has {self.mixture.dim}")
        t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        a = torch.as_tensor(self.schedule.alpha(t64), dtype=torch.float64).reshape(-1, 1)
        s = torch.as_tensor(self.schedule.sigma(t64), dtype=torch.float64).reshape(-1, 1)
        pure = (a <= 0).expand(b, 1).reshape(-1)  # flow matching at sigma = 1: E[x0 | x] is the prior mean
        a_safe = torch.where(a > 0, a, torch.ones_like(a))
        x0 = self.mixture.denoise_ve(xf / a_safe, (s / a_safe).reshape(-1), c)
        if bool(pure.any()):
            x0[pure] = self.mixture.prior_mean(c, b)[pure]
        eps = (xf - a * x0) / s
        out = from_x0_eps(x0, eps, a.reshape(-1), s.reshape(-1), self.prediction_type)
        return out.reshape(x.shape).to(x.dtype)


def reference_solve(
    mixture: GaussianMixture,
    x_start: torch.Tensor,
    s_start: float,
    s_end: float = 0.0,
    c=None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Integrate the probability-flow ODE ``dy/ds = eps(y, s)`` in VE coordinates (see the module
    docstring) from ``y = x_start`` at ``s_start`` to ``s_end`` with scipy's DOP853 in float64.

    ``x_start`` is in VE coordinates (for a VP state divide by ``alpha``); returns the VE state at
    ``s_end`` (the data sample when ``s_end = 0``), float64 with ``x_start``'s shape.
    """
    from scipy.integrate import solve_ivp

    shape = x_start.shape
    y0 = x_start.reshape(shape[0], -1).double()

    def f(s, y):
        yt = torch.from_numpy(y).reshape(y0.shape)
        return mixture.eps_ve(yt, float(s), c).reshape(-1).numpy()

    sol = solve_ivp(f, (float(s_start), float(s_end)), y0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:  # pragma: no cover - scipy failure is an environment problem
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def _eps_and_l(mixture: GaussianMixture, y: torch.Tensor, lam: torch.Tensor):
    """``eps(y, lambda)`` and ``l = sigma * diag(d eps / dx)`` of the unconditional mixture, rows of
    ``y`` (B, D) at ``lam`` (B,), float64. With ``s = e^{-lambda}``, ``m_k = (y - mu_k) / (v_k + s^2)``
    and responsibilities ``g_k``: ``eps = s sum_k g_k m_k`` and (``dx = alpha dy``)
    ``l = s^2 (E_g[1 / (v + s^2)] - Var_g[m])`` per dimension (``d g_k / dy = -g_k (m_k - E_g m)``)."""
    s = torch.exp(-lam).reshape(-1, 1, 1)
    mu, v = mixture.means.double()[None], mixture.variances.double()[None]
    var = v + s**2
    diff = y[:, None, :] - mu
    logp = -0.5 * ((diff**2) / var + torch.log(2 * math.pi * var)).sum(-1) + torch.log(mixture.weights.double())[None]
    g = torch.softmax(logp, dim=1)[:, :, None]
    m = diff / var
    e_m = (g * m).sum(1)
    eps = s[:, 0] * e_m
    l = s[:, 0] ** 2 * ((g / var).sum(1) - ((g * m * m).sum(1) - e_m**2))  # noqa: E741 (paper notation)
    return eps, l


def mixture_ems(mixture: GaussianMixture, schedule: NoiseSchedule, num_grid: int, num_samples: int,
                seed: int = 0, t_range=None, chunk_rows: int = 2048):
    """DPM-Solver-v3's EMS (paper Eq. 7-8, 58-61) of the unconditional ``mixture``, for testing.

    One set of ``num_samples`` draws ``(x0, z)`` is used at every grid point (``y = x0 + e^{-lambda} z``),
    so the Monte-Carlo error is a smooth function of ``lambda``; ``l`` uses the closed-form Jacobian
    diagonal (no Hutchinson probes), ``dl/dlambda`` and ``eps^(1) = d eps/dlambda`` along the ODE
    (``dy/dlambda = -e^{-lambda} eps``) are exact forward-mode derivatives (no finite differences).
    ``s = Cov(f, f^(1)) / Var(f)``, ``b = E f^(1) - s E f`` with ``f = e^{-lambda} eps - l y``
    (``s = 0`` where ``f`` is deterministic, e.g. a single Gaussian, for which these EMS are exact:
    ``l = 1 / (1 + v e^{2 lambda})``, ``s = 0``, ``b = -(dl/dlambda) mu``). Returns an
    :class:`fewstep.samplers.EMS` on :func:`fewstep.samplers.ems.lambda_grid`'s grid."""
    from .samplers.ems import EMS, lambda_grid

    lam, ts = lambda_grid(schedule, num_grid, t_range)
    gen = torch.Generator().manual_seed(int(seed))
    x0 = mixture.sample(int(num_samples), generator=gen)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    k = x0.shape[0]
    per = max(1, chunk_rows // k)
    out = {name: np.zeros((len(lam), mixture.dim)) for name in ("l", "l_d", "f", "f1", "ff", "ff1")}

    def l_of(lam_rows):
        y = x0.repeat(len(lam_rows) // k, 1) + torch.exp(-lam_rows)[:, None] * z.repeat(len(lam_rows) // k, 1)
        return _eps_and_l(mixture, y, lam_rows)[1]

    def eps_of(y, lam_rows):
        return _eps_and_l(mixture, y, lam_rows)[0]

    for j0 in range(0, len(lam), per):
        idx = np.arange(j0, min(len(lam), j0 + per))
        lam_rows = torch.from_numpy(np.repeat(lam[idx], k))
        l_rows, ld_rows = torch.func.jvp(l_of, (lam_rows,), (torch.ones_like(lam_rows),))
        mean = lambda u: u.reshape(len(idx), k, -1).mean(1)  # noqa: E731
        l_m, ld_m = mean(l_rows), mean(ld_rows)
        s = torch.exp(-lam_rows)[:, None]
        y = x0.repeat(len(idx), 1) + s * z.repeat(len(idx), 1)
        eps = eps_of(y, lam_rows)
        _, eps1 = torch.func.jvp(eps_of, (y, lam_rows), (-s * eps, torch.ones_like(lam_rows)))
        l_r, ld_r = l_m.repeat_interleave(k, 0), ld_m.repeat_interleave(k, 0)
        f = s * eps - l_r * y
        f1 = s * ((l_r - 1.0) * eps + eps1) - ld_r * y
        for name, val in (("l", l_m), ("l_d", ld_m), ("f", mean(f)), ("f1", mean(f1)), ("ff", mean(f * f)),
                          ("ff1", mean(f * f1))):
            out[name][idx] = val.numpy()
    var = out["ff"] - out["f"] ** 2
    cov = out["ff1"] - out["f"] * out["f1"]
    fixed = var <= 1e-12 * np.maximum(out["ff"], 1e-300)
    s_arr = np.where(fixed, 0.0, cov / np.where(fixed, 1.0, var))
    b_arr = out["f1"] - s_arr * out["f"]
    meta = {"num_grid": int(num_grid), "num_samples": k, "seed": int(seed), "model_id": "mixture_ems (exact Jacobian)"}
    return EMS(lam, ts, out["l"], s_arr, b_arr, l_d=out["l_d"], metadata=meta)
