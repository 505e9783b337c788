"""f-divergence distribution matching: the weighting ``h(r)`` of each f, the density ratio from a
discriminator logit, its clipping and normalisations, and the discriminator's logistic loss.

f-distill (Xu, Nie, Vahdat 2025, arXiv 2502.15681, Sec. 3) minimises ``D_f(p || q) = E_q[f(p/q)]``
between the teacher's distribution ``p`` and the one-step generator's ``q``. Its gradient with respect
to the generator parameters is the variational-score-distillation (DMD) gradient reweighted per
sample by ``h(r) = f''(r) r^2`` at ``r = p_t(x_t) / q_t(x_t)`` (paper Thm. 1)::

    grad_theta D_f = -E[ h(r(x_t)) (grad log p_t(x_t) - grad log q_t(x_t)) d x_t / d theta ]

``h == 1`` is reverse KL, i.e. DMD. The ratio ``r`` is not known: a discriminator ``D`` trained with
the logistic loss ``softplus(D(fake)) + softplus(-D(real))`` has the optimal logit
``log p_t / q_t`` (Goodfellow et al. 2014, Prop. 1), so ``r = exp(D)``. As FastGen's f-distill
(``f_distill.py::_get_f_div_weighting_h``) the logit is clamped to ``[-10, 10]``, ``r`` clipped to
``[ratio_lower, ratio_upper]``, optionally divided by a per-time-bin running mean of ``r``
(:class:`RatioBins`), and ``h`` divided by its batch mean so that ``E[h] = 1``.

All functions here are pure tensor math (float64-safe) so that they can be checked against closed
forms (tests/test_fdistill.py); the training method is :mod:`fewstep.distill.methods.distribution`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FDivergence:
    """One f-divergence: ``f(r)`` (convex, ``f(1) = 0``) and its weighting ``h(r) = f''(r) r^2``."""

    name: str
    title: str
    f: Callable[[torch.Tensor], torch.Tensor]
    h: Callable[[torch.Tensor], torch.Tensor]
    h_text: str


def _xlogx(r):
    return r * torch.log(r)


#: the f of f-distill's Table 1 (FastGen keys) plus Pearson chi^2; ``h`` is exactly ``f''(r) r^2``
#: (constant factors included: the batch normalisation removes them in training)
F_DIVERGENCES: dict[str, FDivergence] = {d.name: d for d in (
    FDivergence("rkl", "reverse KL (DMD)", lambda r: -torch.log(r), lambda r: torch.ones_like(r), "1"),
    FDivergence("kl", "forward KL", lambda r: _xlogx(r), lambda r: r, "r"),
    FDivergence("js", "Jensen-Shannon", lambda r: _xlogx(r) - (1 + r) * torch.log((1 + r) / 2),
                lambda r: r / (1 + r), "r / (1 + r)"),
    FDivergence("sh", "squared Hellinger", lambda r: (torch.sqrt(r) - 1) ** 2, lambda r: 0.5 * torch.sqrt(r),
                "sqrt(r) / 2"),
    FDivergence("sf", "softened reverse KL", lambda r: (r + 1) * torch.log((r + 1) / (2 * r)),
                lambda r: 1 / (1 + r), "1 / (1 + r)"),
    FDivergence("jf", "Jeffreys", lambda r: (r - 1) * torch.log(r), lambda r: 1 + r, "1 + r"),
    FDivergence("neyman", "Neyman chi^2", lambda r: (1 - r) ** 2 / r, lambda r: 2 / r.clamp_min(1e-8), "2 / r"),
    FDivergence("pearson", "Pearson chi^2", lambda r: (r - 1) ** 2, lambda r: 2 * r**2, "2 r^2"),
)}

#: accepted spellings of the f names (CLI/config), mapped to the keys of :data:`F_DIVERGENCES`
F_ALIASES = {"reverse_kl": "rkl", "dmd": "rkl", "forward_kl": "kl", "jensen_shannon": "js",
             "squared_hellinger": "sh", "hellinger": "sh", "softened_rkl": "sf", "jeffreys": "jf",
             "neyman_chi2": "neyman", "pearson_chi2": "pearson", "chi2": "pearson"}

F_NAMES = tuple(F_DIVERGENCES) + tuple(F_ALIASES)


def get_f(name: str) -> FDivergence:
    """The f-divergence ``name`` (a key of :data:`F_DIVERGENCES` or an alias); ``ValueError`` otherwise."""
    key = F_ALIASES.get(name, name)
    if key not in F_DIVERGENCES:
        raise ValueError(f"f-divergence {name!r} is not supported; allowed: {', '.join(F_NAMES)}")
    return F_DIVERGENCES[key]


def density_ratio(logit: torch.Tensor, lower: float = 0.1, upper: float = 20.0,
                  logit_clamp: float = 10.0) -> torch.Tensor:
    """``r = clip(exp(clamp(logit, +-logit_clamp)), lower, upper)``: the ratio ``p_t / q_t`` read from a
    logistic discriminator's logit (detached; shape of ``logit``)."""
    if not 0 < lower <= 1 <= upper:
        raise ValueError(f"ratio clipping needs 0 < lower <= 1 <= upper, got lower={lower}, upper={upper}")
    return torch.exp(logit.detach().clamp(-logit_clamp, logit_clamp)).clamp(lower, upper)


def f_weights(name: str, r: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``h(r)`` of the f-divergence ``name`` per sample; with ``normalize`` divided by its batch mean
    (``E[h] = 1`` over the batch, FastGen's normalisation; under DDP the caller all-reduces the mean)."""
    h = get_f(name).h(r)
    return h / h.mean().clamp_min(1e-12) if normalize else h


def discriminator_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """Logistic (non-saturating GAN) loss ``E softplus(-D(real)) + E softplus(D(fake))``: its minimiser
    is ``D = log p / q`` for real ~ p, fake ~ q."""
    return F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()


def generator_gan_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator GAN loss ``E softplus(-D(G(z)))`` (DMD2, Yin et al. 2024, Eq. 4)."""
    return F.softplus(-fake_logit).mean()


def matching_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, h: torch.Tensor | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """The per-sample distribution-matching gradient in data space (DMD, Yin et al. 2024, Eq. 7-8, with
    f-distill's weight): ``h_i (fake_x0 - real_x0) / (mean|x - real_x0| + eps)``, the normaliser a
    per-sample mean over all dimensions. ``x``: generator samples; ``real_x0``/``fake_x0``: the
    teacher's and the fake score's clean predictions at the noised samples; ``h``: (B,) weights."""
    dims = tuple(range(1, x.ndim))
    norm = (x - real_x0).abs().mean(dim=dims, keepdim=True) + eps
    g = (fake_x0 - real_x0) / norm
    if h is not None:
        g = h.to(g).reshape(-1, *([1] * (x.ndim - 1))) * g
    return g


def matching_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((x - sg(x - grad))^2)``: a loss whose gradient in ``x`` is ``grad / numel(x)``."""
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())


class RatioBins(torch.nn.Module):
    """Per-time-bin normalisation of ``r`` (f-distill's ``ratio_normalization``): ``num_bins`` equal
    bins over ``[t_low, t_high]``; every bin holds a running mean of ``r`` (EMA with ``rate``; 0: the
    current batch's bin mean), and ``r`` is divided by its bin's mean. Bins without samples in a
    batch keep their value. The means are a buffer (checkpointed with the run)."""

    def __init__(self, num_bins: int, t_low: float, t_high: float, rate: float = 0.0):
        super().__init__()
        if num_bins < 1 or not t_high > t_low or not 0 <= rate < 1:
            raise ValueError(f"RatioBins needs num_bins >= 1, t_high > t_low and 0 <= rate < 1; got {num_bins}, "
                             f"[{t_low}, {t_high}], {rate}")
        self.num_bins, self.t_low, self.t_high, self.rate = int(num_bins), float(t_low), float(t_high), float(rate)
        self.register_buffer("means", torch.ones(self.num_bins, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(self.num_bins, dtype=torch.float64))

    def index(self, t: torch.Tensor) -> torch.Tensor:
        u = (t.double() - self.t_low) / (self.t_high - self.t_low)
        return (u * self.num_bins).floor().long().clamp(0, self.num_bins - 1)

    @torch.no_grad()
    def update(self, r: torch.Tensor, t: torch.Tensor) -> None:
        idx = self.index(t).to(self.means.device)
        r = r.double().reshape(-1).to(self.means.device)
        total = torch.zeros_like(self.means).index_add_(0, idx, r)
        count = torch.zeros_like(self.means).index_add_(0, idx, torch.ones_like(r))
        hit = count > 0
        batch_mean = total[hit] / count[hit]
        first = self.seen[hit] == 0
        rate = torch.where(first, torch.zeros_like(batch_mean), torch.full_like(batch_mean, self.rate))
        self.means[hit] = rate * self.means[hit] + (1 - rate) * batch_mean
        self.seen[hit] = 1.0

    def normalize(self, r: torch.Tensor, t: torch.Tensor, update: bool = True) -> torch.Tensor:
        """``r / mean_bin(t)`` (after updating the bins with this batch when ``update``)."""
        if update:
            self.update(r, t)
        return r / self.means[self.index(t).to(self.means.device)].to(r)

