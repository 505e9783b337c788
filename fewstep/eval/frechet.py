"""Frechet distance between Gaussians and streaming feature statistics.

This module is the single place where fewstep computes a Frechet distance: FID (Inception
features) and FD-digits (digits-classifier features) both call :func:`frechet_distance`.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["frechet_distance", "FeatureStats", "check_sample_size", "fid_from_stats", "load_stats", "is_stats_file",
           "STATS_FORMAT_VERSION"]

STATS_FORMAT_VERSION = 1


def _as_float64(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    return x.detach().to(device="cpu", dtype=torch.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})`` (Dowson &
    Landau 1982; Heusel et al. 2017, Eq. 6), with ``tr((sigma1 sigma2)^{1/2}) = sum sqrt(eig(S sigma2 S))``,
    ``S = sigma1^{1/2}`` from ``eigh`` (negative eigenvalues of rank-deficient covariances clamped to
    0). Equals scipy's ``tr(sqrtm(sigma1 @ sigma2))`` to rounding. Why this method and not float32:
    docs/evaluation.md, "Frechet distance".

    Args:
        mu1, mu2: mean vectors, shape (D,). Tensors or numpy arrays, any float dtype.
        sigma1, sigma2: covariance matrices, shape (D, D).

    Returns:
        The squared Frechet distance as a Python float (that is what "FID" reports).
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(
            f"mu1 and mu2 must be vectors of the same length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}"
        )
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match the means, got {tuple(s.shape)}")
    for name, t in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains non-finite values")
    diff = mu1 - mu2
    w, v = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    sw = w.clamp(min=0).sqrt()
    # eig(S sigma2 S) with S = V diag(sw) V^T equals eig(diag(sw) V^T sigma2 V diag(sw)) (V is
    # orthogonal): two D^3 matmuls instead of three. Directions with sw == 0 (the clamped
    # null space of a rank-deficient sigma1) only add exact zero rows/columns, so they are dropped.
    nz = sw > 0
    if not bool(nz.all()):
        v, sw = v[:, nz], sw[nz]
    m = (v.T @ sigma2 @ v) * sw[:, None] * sw[None, :]
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    fd = diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2.0 * tr_covmean
    return float(fd)


@dataclass
class FeatureStats:
    """Streaming first and second moments of a feature set, in float64.

    Holds ``n``, ``sum = sum_i f_i`` and ``sum_outer = sum_i f_i f_i^T`` (the running sums that
    torchmetrics' ``FrechetInceptionDistance`` keeps), so memory is O(D^2) whatever the number
    of images. ``mean`` and the unbiased covariance ``cov`` (divisor n-1, as ``np.cov``) are
    derived from them. ``meta`` records how the features were made (extractor name,
    preprocessing mode, ...) and is checked by :meth:`check_compatible` before two statistics
    are compared.

    Files are ``.npz`` with arrays ``mu`` (D,), ``sigma`` (D, D), ``n`` () and ``meta`` (a JSON
    string), readable by any tool that expects the NVlabs/clean-fid ``mu``/``sigma`` keys.
    ``origin`` says where the statistics come from (a file, a folder's features) for error
    messages; it is not saved.
    """

    dim: int
    n: int = 0
    sum: torch.Tensor | None = None
    sum_outer: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    origin: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if self.sum is None:
            self.sum = torch.zeros(self.dim, dtype=torch.float64)
        if self.sum_outer is None:
            self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> "FeatureStats":
        """Add a batch of features, shape (B, D); accumulated in float64 on the CPU."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().to(device="cpu", dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another statistics object's sums into this one (same dim)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def all_reduce(self) -> "FeatureStats":
        """Sum ``n``, ``sum`` and ``sum_outer`` over all processes of an initialised
        ``torch.distributed`` group (as torchmetrics' ``dist_reduce_fx="sum"``); no-op otherwise."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            buf = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.sum_outer.flatten()])
            dist.all_reduce(buf)
            self.n = int(round(buf[0].item()))
            self.sum = buf[1 : 1 + self.dim].clone()
            self.sum_outer = buf[1 + self.dim :].reshape(self.dim, self.dim).clone()
        return self

    @property
    def mean(self) -> torch.Tensor:
        """Mean feature vector (D,), float64."""
        if self.n < 1:
            raise ValueError("statistics are empty (n=0)")
        return self.sum / self.n

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance (D, D), float64: (sum_outer - n mu mu^T) / (n - 1)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got n={self.n}")
        mu = self.mean
        return (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    @classmethod
    def from_features(cls, features: torch.Tensor, meta: dict | None = None) -> "FeatureStats":
        """Statistics of a (N, D) feature matrix."""
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            raise ValueError("features must be a 2-D torch.Tensor (N, D)")
        return cls(dim=int(features.shape[1]), meta=dict(meta or {})).update(features)

    @classmethod
    def from_moments(cls, mu, sigma, n: int, meta: dict | None = None) -> "FeatureStats":
        """Rebuild the running sums from a mean, an unbiased covariance and a count."""
        mu, sigma = _as_float64(mu, "mu"), _as_float64(sigma, "sigma")
        n = int(n)
        if n < 2:
            raise ValueError(f"n must be >= 2 for saved statistics, got {n}")
        st = cls(dim=int(mu.shape[0]), meta=dict(meta or {}))
        st.n = n
        st.sum = mu * n
        st.sum_outer = sigma * (n - 1) + n * torch.outer(mu, mu)
        return st

    def _named(self) -> str:
        return f" ({self.origin})" if self.origin else ""

    def check_compatible(self, other: "FeatureStats") -> None:
        """Raise ValueError if the two statistics were made with a different feature extractor
        or preprocessing (keys ``extractor`` and ``preprocess`` of ``meta``) or have different
        dimensions, naming both sides (:attr:`origin`). Keys missing on one side (e.g. a foreign
        ``.npz``) only warn."""
        if self.dim != other.dim:
            raise ValueError(
                f"feature dimensions differ: {self.dim} ({self.meta.get('extractor', 'unknown extractor')}"
                f"{', ' + self.origin if self.origin else ''}) vs {other.dim} "
                f"({other.meta.get('extractor', 'unknown extractor')}{', ' + other.origin if other.origin else ''}); "
                "statistics of different feature extractors cannot be compared"
            )
        for key in ("extractor", "preprocess"):
            a, b = self.meta.get(key), other.meta.get(key)
            if a is None or b is None:
                if a != b:
                    warnings.warn(
                        f"statistics do not record '{key}' on both sides ({a!r}{self._named()} vs "
                        f"{b!r}{other._named()}); cannot verify they were made the same way",
                        stacklevel=2,
                    )
            elif a != b:
                raise ValueError(
                    f"refusing to compare statistics made with different {key}: {a!r}{self._named()} vs "
                    f"{b!r}{other._named()}; recompute one side with {key}={b!r} or {a!r}"
                )

    def check_extractor(self, extractor) -> None:
        """Raise ValueError unless these statistics can be compared with features of
        ``extractor`` (a module with ``num_features`` and ``meta()``, e.g.
        :class:`~fewstep.eval.inception.InceptionFeatures`): the check to run before a feature pass."""
        name = getattr(extractor, "name", type(extractor).__name__)
        FeatureStats(dim=int(extractor.num_features), meta=extractor.meta(),
                     origin=f"the extractor {name}").check_compatible(self)

    def frechet_distance(self, other: "FeatureStats") -> float:
        """Frechet distance to ``other`` after :meth:`check_compatible`; see :func:`frechet_distance`."""
        self.check_compatible(other)
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def save(self, path: str | os.PathLike, features: torch.Tensor | np.ndarray | None = None) -> None:
        """Write ``mu``, ``sigma``, ``n`` and ``meta`` (JSON), and the (N, D) ``features`` when
        given (key ``feats``, as clean-fid; KID needs them), to an ``.npz`` at exactly ``path`` (no
        suffix is added). The file is written atomically (:func:`fewstep._io.atomic_open`): an
        interrupted save leaves the previous file, never a truncated one."""
        from .._io import atomic_open

        path = os.fspath(path)
        meta = dict(self.meta, format_version=STATS_FORMAT_VERSION)
        arrays = dict(mu=self.mean.numpy(), sigma=self.cov.numpy(), n=np.int64(self.n), meta=np.array(json.dumps(meta)))
        if features is not None:
            f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
            if f.ndim != 2 or f.shape[1] != self.dim or f.shape[0] != self.n:
                raise ValueError(f"features must have shape ({self.n}, {self.dim}) to match the statistics, "
                                 f"got {tuple(f.shape)}")
            arrays["feats"] = f
        with atomic_open(path, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read an ``.npz`` written by :meth:`save`, or a foreign one with only ``mu``/``sigma``
        (NVlabs/EDM, clean-fid): its count is unknown, so ``n`` is set to 2 (only mean and
        covariance matter for FID) and ``meta["n_unknown"] = True``; its missing extractor and
        preprocessing make comparisons warn rather than fail.

        The file is checked: a truncated or foreign file, ``mu`` not a finite vector (D,),
        ``sigma`` not a finite symmetric (D, D) matrix with non-negative variances, ``n`` not an
        integer >= 2, ``meta`` not a JSON object or recording another dimension: ValueError
        naming the file and what is wrong."""
        st, _ = _load(path, need_features=False)
        return st


def _stats_error(path: str, what: str) -> ValueError:
    return ValueError(f"statistics file {path}: {what}")


def _read_npz(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (those present) of the ``.npz`` at ``path``; ValueError naming the file
    when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):  # np.load of a .npy gives one array
                raise ValueError(f"it holds one array, not named arrays (type {type(z).__name__})")
            files = list(z.files)
            out = {k: z[k] for k in keys if k in files}
            out["__files__"] = np.array(files)
            return out
    except Exception as err:  # numpy, zipfile and pickle raise many types for a bad file
        raise ValueError(
            f"statistics file {path} cannot be read ({type(err).__name__}: {err}): it is truncated or not an .npz "
            f"of statistics; recompute it with `fewstep eval stats SRC {path}`"
        ) from err


def _check_numbers(path: str, name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "fiu":
        raise _stats_error(path, f"{name} must hold numbers, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise _stats_error(path, f"{name} contains non-finite values (NaN or inf)")
    return a


def _load(path, need_features: bool) -> tuple[FeatureStats, torch.Tensor | None]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file not found: {path}")
    z = _read_npz(path, ("mu", "sigma", "n", "meta") + (("feats",) if need_features else ()))
    files = [str(f) for f in z.pop("__files__")]
    if "mu" not in z or "sigma" not in z:
        raise ValueError(f"{path} is not a statistics file: it needs arrays 'mu' and 'sigma', has {sorted(files)}")
    mu, sigma = _check_numbers(path, "mu", z["mu"]), _check_numbers(path, "sigma", z["sigma"])
    if mu.ndim != 1 or mu.shape[0] < 1:
        raise _stats_error(path, f"mu must be a vector (D,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise _stats_error(path, f"sigma has shape {sigma.shape} but mu has {d} entries; sigma must be ({d}, {d}) "
                                 "(mu and sigma of different statistics?)")
    sigma = sigma.astype(np.float64)
    scale = max(float(np.abs(sigma).max()), 1e-300)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise _stats_error(path, f"sigma is not symmetric (max |sigma - sigma^T| = {asym:.3g}), so it is not a "
                                 "covariance matrix")
    if float(np.diag(sigma).min()) < -1e-9 * scale:
        raise _stats_error(path, "sigma has negative variances on its diagonal, so it is not a covariance matrix")
    meta: dict = {}
    if "meta" in z:
        try:
            meta = json.loads(str(z["meta"]))
        except ValueError as err:
            raise _stats_error(path, f"meta is not valid JSON ({err})") from err
        if not isinstance(meta, dict):
            raise _stats_error(path, f"meta must be a JSON object, got {type(meta).__name__}")
    if "dim" in meta and meta["dim"] != d:
        raise _stats_error(path, f"meta records {meta['dim']}-dimensional features but mu has {d} entries")
    if "n" in z:
        n_arr = z["n"]
        n_val = n_arr.reshape(-1)[0] if n_arr.size == 1 and n_arr.dtype.kind in "fiu" else None
        if n_val is None or not float(n_val).is_integer() or n_val < 2:
            raise _stats_error(path, f"n must be an integer >= 2 (the number of images), got {n_arr!r}")
        n = int(n_val)
    else:
        n = 2
        meta["n_unknown"] = True
    meta.pop("format_version", None)
    st = FeatureStats.from_moments(mu, sigma, n, meta)
    st.origin = f"statistics {path}"
    feats = None
    if need_features:
        if "feats" not in z:
            raise ValueError(f"{path} holds no features; KID needs them: recompute with "
                             "`fewstep eval stats SRC OUT --keep-features`")
        f = _check_numbers(path, "feats", z["feats"])
        if f.ndim != 2 or f.shape[1] != d or (not meta.get("n_unknown") and f.shape[0] != n):
            rows = "N" if meta.get("n_unknown") else str(n)
            raise _stats_error(path, f"feats has shape {f.shape} but mu has {d} entries; feats must be ({rows}, {d})")
        feats = torch.from_numpy(np.array(f, copy=True))
    return st, feats


def load_stats(path: str | os.PathLike, need_features: bool = False) -> tuple[FeatureStats, torch.Tensor | None]:
    """``(FeatureStats, features)`` of a statistics file: :meth:`FeatureStats.load` with its
    checks, plus the (N, D) per-image features (key ``feats``, written by ``fewstep eval stats
    --keep-features``; KID needs them) when ``need_features``, else None. A missing or
    mis-shaped ``feats`` is a ValueError naming the file."""
    return _load(path, need_features)


def is_stats_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is to be read as a statistics file: a file named ``*.npz`` (checked when
    it is loaded), or any zip archive holding ``mu.npy`` and ``sigma.npy`` (statistics saved
    under another name)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        return False
    if p.lower().endswith(".npz"):
        return True
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    return {"mu.npy", "sigma.npy"} <= names


def check_sample_size(n: int, dim: int, what: str = "images") -> None:
    """Raise ValueError for fewer than 2 samples; warn when ``n < dim``: the covariance is then
    rank-deficient and the distance biased upward (docs/evaluation.md, "Sample size")."""
    if n < 2:
        raise ValueError(f"need at least 2 {what} to estimate a covariance, got {n}")
    if n < dim:
        warnings.warn(
            f"only {n} {what} for {dim}-dimensional features: the covariance is rank-deficient and "
            "the Frechet distance is biased upward (it falls as N grows); compare scores only at equal N, "
            f"and use >= {dim} samples (for FID ideally 10k-50k) for reportable numbers",
            stacklevel=3,
        )


def fid_from_stats(gen: FeatureStats, ref: FeatureStats) -> float:
    """FID between two feature statistics (Heusel et al. 2017): checks both were made with the
    same extractor and preprocessing, checks sample sizes, then the float64 Frechet distance."""
    check_sample_size(gen.n, gen.dim, "generated images")
    check_sample_size(ref.n, ref.dim, "reference images")
    return gen.frechet_distance(ref)
