"""FID and KID: torchmetrics-style metrics on the offline FID Inception, and the shared math.

* :class:`FID` is torchmetrics' ``FrechetInceptionDistance`` with our
  :class:`~fewstep.eval.inception.InceptionFeatures` as ``feature`` (float64 running sums,
  ``update``/``compute``/``reset``, distributed sync by torchmetrics) whose ``compute`` goes through
  :func:`fewstep.eval.frechet.frechet_distance` and which can take saved reference statistics.
* :class:`KID` is torchmetrics' ``KernelInceptionDistance`` with the same extractor, features
  kept in float64 and a seeded subset draw (torchmetrics' own draw is unseeded).
* :func:`fid_from_stats` and :func:`kernel_inception_distance` are the functional forms the
  ``fewstep eval`` command uses.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.utilities.data import dim_zero_cat

from .frechet import FeatureStats, check_sample_size, fid_from_stats
from .inception import InceptionFeatures

__all__ = ["FID", "KID", "fid_from_stats", "kernel_inception_distance", "check_sample_size"]


def kernel_inception_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the polynomial kernel
    ``k(x, y) = (gamma x.y + coef)^degree`` (gamma = 1/D by default) averaged over ``subsets``
    random subsets of ``subset_size`` features per side. Uses torchmetrics' ``poly_mmd`` in
    float64; returns ``(mean, std)`` with the biased std, as torchmetrics and torch-fidelity.
    Subsets are drawn from a ``torch.Generator`` seeded with ``seed`` (reproducible).
    """
    real = real.detach().to("cpu", torch.float64)
    fake = fake.detach().to("cpu", torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real and fake must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets must be a positive int, got {subsets!r}")
    if not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size must be an int >= 2, got {subset_size!r}")
    n = min(len(real), len(fake))
    if subset_size > n:
        raise ValueError(
            f"subset_size={subset_size} exceeds the number of samples ({len(real)} real, {len(fake)} fake)"
        )
    g = torch.Generator().manual_seed(int(seed))
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=g)[:subset_size]]
        f = fake[torch.randperm(len(fake), generator=g)[:subset_size]]
        scores.append(poly_mmd(r, f, degree, gamma, coef))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


class FID(FrechetInceptionDistance):
    """Frechet Inception Distance, torchmetrics-style, on the offline FID Inception.

    ``FID(preprocess="tf", inception_weights=None)`` builds :class:`InceptionFeatures`
    (pass ``feature=`` to use another module with ``num_features``). ``update(images, real)``
    takes uint8 (B, C, H, W) or float in [0, 1] (rounded to uint8). States are torchmetrics'
    float64 running sums; ``compute()`` returns a float64 scalar tensor from
    :func:`fid_from_stats`. :meth:`set_reference` loads saved reference statistics as the real
    side (kept across ``reset()``); :meth:`get_stats` exports either side.
    """

    def __init__(
        self, feature: torch.nn.Module | None = None, preprocess: str = "tf", inception_weights=None, **kwargs
    ):
        if feature is None:
            feature = InceptionFeatures(inception_weights, preprocess)
        elif not isinstance(feature, torch.nn.Module):
            raise TypeError(f"feature must be an nn.Module or None, got {type(feature).__name__}")
        super().__init__(feature=feature, **kwargs)

    def _meta(self) -> dict:
        return self.inception.meta() if hasattr(self.inception, "meta") else {}

    def get_stats(self, real: bool) -> FeatureStats:
        """The accumulated statistics of the real (``True``) or fake side."""
        side = "real" if real else "fake"
        s = getattr(self, f"{side}_features_sum")
        st = FeatureStats(dim=int(s.shape[0]), meta=self._meta())
        st.n = int(getattr(self, f"{side}_features_num_samples"))
        st.sum = s.detach().cpu().double().clone()
        st.sum_outer = getattr(self, f"{side}_features_cov_sum").detach().cpu().double().clone()
        return st

    def set_reference(self, stats: FeatureStats) -> None:
        """Use ``stats`` (e.g. ``FeatureStats.load("ref.npz")``) as the real side and keep it
        across ``reset()``; refuses statistics of another extractor or preprocessing."""
        if not isinstance(stats, FeatureStats):
            raise TypeError(f"stats must be a FeatureStats, got {type(stats).__name__}")
        dim = int(getattr(self.inception, "num_features", self.real_features_sum.shape[0]))
        FeatureStats(dim=dim, meta=self._meta(), origin="this metric's extractor").check_compatible(stats)
        dev = self.real_features_sum.device
        self.real_features_sum = stats.sum.to(dev).clone()
        self.real_features_cov_sum = stats.sum_outer.to(dev).clone()
        self.real_features_num_samples = torch.tensor(stats.n, device=dev)
        self.reset_real_features = False
        # make reset() restore the reference rather than zeros
        self._defaults["real_features_sum"] = self.real_features_sum.clone()
        self._defaults["real_features_cov_sum"] = self.real_features_cov_sum.clone()
        self._defaults["real_features_num_samples"] = self.real_features_num_samples.clone()

    def compute(self) -> torch.Tensor:
        """FID between the accumulated real and fake statistics (float64 scalar tensor)."""
        return torch.tensor(fid_from_stats(self.get_stats(False), self.get_stats(True)), dtype=torch.float64)


class KID(KernelInceptionDistance):
    """Kernel Inception Distance, torchmetrics-style, on the offline FID Inception.

    As torchmetrics' ``KernelInceptionDistance`` (same arguments: ``subsets``,
    ``subset_size``, ``degree``, ``gamma``, ``coef``) but features are stored in float64 and
    ``compute()`` calls :func:`kernel_inception_distance` with a seeded subset draw (``seed``).
    Returns ``(mean, std)`` float64 tensors.
    """

    def __init__(
        self,
        feature: torch.nn.Module | None = None,
        preprocess: str = "tf",
        inception_weights=None,
        seed: int = 0,
        **kwargs,
    ):
        if feature is None:
            feature = InceptionFeatures(inception_weights, preprocess)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            super().__init__(feature=feature, **kwargs)
        self.seed = seed

    def update(self, imgs: torch.Tensor, real: bool) -> None:
        """Extract features of ``imgs`` (uint8, or float in [0, 1] rounded) and store them in float64."""
        feats = self.inception(imgs).double()
        (self.real_features if real else self.fake_features).append(feats)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """KID mean and std over subsets; see :func:`kernel_inception_distance`."""
        m, s = kernel_inception_distance(
            dim_zero_cat(self.real_features),
            dim_zero_cat(self.fake_features),
            self.subsets,
            self.subset_size,
            self.degree,
            self.gamma,
            self.coef,
            self.seed,
        )
        return torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
