"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023, arXiv
2310.13268): the :class:`EMS` object with the integrals the solver needs, its safetensors I/O, and
resolving EMS names (a path, a folder, or a shipped set such as ``"digits"``).

Per-dimension statistics ``l, s, b`` on a grid uniform in half log-SNR ``lambda`` (paper Eq. 6-9);
``L = int l``, ``S = int s``, ``B = int e^{-S} b`` by the trapezoid rule, and the step weights
relative to the step's start (overflow-free). :func:`fewstep.samplers.compute_ems` estimates them
(:mod:`fewstep.samplers.ems_estimate`). Definitions: docs/samplers-reference.md ("EMS internals").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .._imports import moved_names
from .._io import atomic_paths
from ..models import shipped_file
from ..schedule import NoiseSchedule

EMS_FORMAT = "fewstep-ems-v1"
METADATA_KEY = "fewstep_ems"
SHIPPED = {
    "digits": "digits_ems.safetensors",
    "digits-cfg2": "digits_ems_cfg2.safetensors",
}


# ------------------------------------------------------------------------------------------------
# small numerics
# ------------------------------------------------------------------------------------------------
def cumulative_trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``out[j] = int_{x_0}^{x_j} y`` by the trapezoid rule along axis 0 (``out[0] = 0``)."""
    dx = np.diff(x).reshape((-1,) + (1,) * (y.ndim - 1))
    inc = 0.5 * (y[1:] + y[:-1]) * dx
    return np.concatenate([np.zeros_like(y[:1]), np.cumsum(inc, axis=0)], axis=0)


def jsonable(value):
    """``value`` with arrays, numpy scalars and non-finite floats turned into JSON-able python values."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------------
# the EMS object
# ------------------------------------------------------------------------------------------------
class EMS:
    """Empirical model statistics of DPM-Solver-v3 (paper Sec. 3.1, Eq. 6-9) on a grid uniform in
    lambda, with the precomputed integrals the solver needs.

    Attributes:
        lambdas: ``(N + 1,)`` float64, increasing (index 0 = noisiest point, ``lambda(t_max)``).
        timesteps: ``(N + 1,)`` float64 training-scale model times of the grid points.
        l, s, b: ``(N + 1, *shape)`` float64 per-dimension statistics (``shape`` = one sample's shape).
        l_d: ``(N + 1, *shape)`` smoothed ``dl/dlambda`` used for ``f^(1)`` (kept for reference).
        L, S, B: cumulative integrals (see the module docstring).
        metadata: settings record (schedule config, grid, t range, K, guidance scale, model id, ...).

    The degenerate statistics ``l = 1, s = 0, b = 0`` turn DPM-Solver-v3 into DPM-Solver++
    (paper App. A.2); ``l = 0, s = -1, b = 0`` into DPM-Solver (noise prediction).
    """

    def __init__(self, lambdas, timesteps, l, s, b, l_d=None, metadata: Mapping[str, Any] | None = None):  # noqa: E741 (paper notation)
        lam = np.asarray(lambdas, dtype=np.float64)
        if lam.ndim != 1 or len(lam) < 2 or np.any(np.diff(lam) <= 0) or not np.all(np.isfinite(lam)):
            raise ValueError("lambdas must be a finite, strictly increasing 1-D array with >= 2 points")
        arrays = {}
        for name, v in (("l", l), ("s", s), ("b", b)):
            a = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
            if a.shape[:1] != lam.shape:
                raise ValueError(f"{name} has leading dimension {a.shape[:1]}, expected {len(lam)} "
                                 "(one per grid point)")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name} contains NaN or inf")
            arrays[name] = a
        if not arrays["l"].shape == arrays["s"].shape == arrays["b"].shape:
            raise ValueError(f"l, s, b must have equal shapes, got {[a.shape for a in arrays.values()]}")
        self.lambdas = lam
        self.timesteps = np.asarray(timesteps, dtype=np.float64)
        if self.timesteps.shape != lam.shape:
            raise ValueError("timesteps must have one entry per grid point")
        self.l, self.s, self.b = arrays["l"], arrays["s"], arrays["b"]
        self.l_d = None if l_d is None else np.asarray(l_d, dtype=np.float64)
        self.metadata = dict(metadata or {})
        self._precompute()

    # ---- derived quantities ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample (``l.shape[1:]``)."""
        return tuple(self.l.shape[1:])

    @property
    def num_grid(self) -> int:
        """Number of grid intervals ``N`` (the grid has ``N + 1`` points)."""
        return len(self.lambdas) - 1

    def _precompute(self) -> None:
        lam = self.lambdas
        self.L = cumulative_trapezoid(self.l, lam)
        self.S = cumulative_trapezoid(self.s, lam)
        # the integrals of e^{L+S} are taken relative to their lower end (exp_coefficient,
        # b_coefficient): absolute cumulative integrals of e^{L+S} overflow float64 on wide ranges
        self.B = cumulative_trapezoid(np.exp(-self.S) * self.b, lam)
        self._ek_cache: dict[tuple[int, int, int], np.ndarray] = {}

    def exp_coefficient(self, i: int, j: int, k: int) -> np.ndarray:
        """``E_k(i, j) = int_{lambda_i}^{lambda_j} e^{(L+S)(lam) - (L+S)(lambda_i)} (lam - lambda_i)^k / k! dlam``
        (paper Eq. 13's high-order weights) by the trapezoid rule over grid points ``i..j``; cached."""
        key = (i, j, k)
        if key not in self._ek_cache:
            lam, growth = self._relative_growth(i, j)
            w = ((lam - lam[0]) ** k / math.factorial(k)).reshape((-1,) + (1,) * (growth.ndim - 1))
            self._ek_cache[key] = np.trapezoid(growth * w, lam, axis=0) if j > i else np.zeros_like(growth[0])
        return self._ek_cache[key]

    def _relative_growth(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """``(lambda_i..lambda_j, e^{(L+S)(lambda) - (L+S)(lambda_i)})`` on grid points ``i..j``: the
        integrand factor of every step weight, relative to the step start (never overflows)."""
        ls = self.L[i : j + 1] + self.S[i : j + 1]
        return self.lambdas[i : j + 1], np.exp(ls - ls[0])

    def refined(self, factor: int, t_of_lambda: Callable[[np.ndarray], np.ndarray]) -> "EMS":
        """The statistics on a grid ``factor`` times finer (uniform in lambda, same end points, every
        original point kept exactly), ``l, s, b`` (and ``l_d``) linearly interpolated in lambda
        between the measured points; ``t_of_lambda`` gives the model times of the new points (the
        schedule's inverse of lambda). Used when a sampling grid is finer than the EMS grid, where
        snapping would merge points. ``metadata["refined_from_num_grid"]`` records the original N."""
        factor = int(factor)
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if factor == 1:
            return self
        n0, n = self.num_grid, self.num_grid * factor
        lam = np.linspace(self.lambdas[0], self.lambdas[-1], n + 1)
        lam[::factor] = self.lambdas
        pos = np.arange(n + 1) / factor
        lo = np.minimum(np.floor(pos).astype(int), n0 - 1)
        w = (pos - lo).reshape((-1,) + (1,) * len(self.shape))

        def interp(a):
            return None if a is None else (1.0 - w) * a[lo] + w * a[lo + 1]

        ts = np.asarray(t_of_lambda(lam), dtype=np.float64)
        ts[::factor] = self.timesteps
        meta = {**self.metadata, "num_grid": n,
                "refined_from_num_grid": int(self.metadata.get("refined_from_num_grid", n0))}
        return EMS(lam, ts, interp(self.l), interp(self.s), interp(self.b), interp(self.l_d), meta)

    def b_coefficient(self, i: int, j: int) -> np.ndarray:
        """``int_{lambda_i}^{lambda_j} e^{(L+S)(lam) - (L+S)(lambda_i)} (B(lam) - B(lambda_i)) dlam``, the
        EMS offset term of paper Eq. 11 (``B = int e^{-S} b``) relative to ``lambda_i``, by the trapezoid
        rule over grid points ``i..j`` (the scheduler multiplies ``e^{L_i + S_i - L_j}`` back); cached."""
        key = (i, j, -1)
        if key not in self._ek_cache:
            lam, growth = self._relative_growth(i, j)
            a = growth * (self.B[i : j + 1] - self.B[i])
            self._ek_cache[key] = np.trapezoid(a, lam, axis=0) if j > i else np.zeros_like(a[0])
        return self._ek_cache[key]

    def index_of(self, lam: np.ndarray | float, tolerance: float = 0.5, refine: int = 1) -> np.ndarray:
        """Nearest grid index of each lambda (the official snapping
        ``round(N (lambda - lambda_0) / (lambda_N - lambda_0))``); a ``ValueError`` when a value lies
        outside the grid by more than ``tolerance`` grid cells. ``refine``: the index on the grid of
        :meth:`refined` with that factor (``N -> refine N``, same end points; ``tolerance`` stays in
        cells of this grid)."""
        lam = np.asarray(lam, dtype=np.float64)
        lo, hi, n = self.lambdas[0], self.lambdas[-1], self.num_grid * int(refine)
        pos = n * (lam - lo) / (hi - lo)
        if np.any(pos < -tolerance * refine) or np.any(pos > n + tolerance * refine):
            raise ValueError(
                f"the sampling grid needs lambda in [{float(np.min(lam)):.4f}, {float(np.max(lam)):.4f}] but the EMS "
                f"cover [{lo:.4f}, {hi:.4f}] (t range {self.timesteps[0]:g}..{self.timesteps[-1]:g}); recompute the "
                "EMS with a wider t_range or sample inside it"
            )
        return np.clip(np.round(pos), 0, n).astype(np.int64)

    # ---- checks ------------------------------------------------------------------------------
    def check_schedule(self, schedule: NoiseSchedule, prediction_type: str | None = None) -> None:
        """Raise ``ValueError`` if these EMS were computed under a different noise schedule: the
        stored model times must map to the stored lambdas through ``schedule`` (tolerance 1e-4)."""
        lam = np.asarray(schedule.lambda_(self.timesteps), dtype=np.float64)
        err = float(np.max(np.abs(lam - self.lambdas)))
        if not err < 1e-4:
            raise ValueError(
                f"ems do not match the scheduler's noise schedule (max |lambda difference| {err:.3g} at the stored "
                f"timesteps); EMS schedule: {self.metadata.get('schedule', {})}"
            )

    def check_shape(self, sample_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if one sample's shape differs from the EMS shape."""
        if tuple(sample_shape) != self.shape:
            raise ValueError(
                f"ems were computed for samples of shape {self.shape} but the sample has shape {tuple(sample_shape)}"
            )

    # ---- construction helpers ----------------------------------------------------------------
    @classmethod
    def degenerated(cls, schedule: NoiseSchedule, shape: tuple[int, ...], num_grid: int = 1200,
                    t_range: tuple[float, float] | None = None) -> "EMS":
        """``l = 1, s = 0, b = 0`` on a lambda grid (DPM-Solver++ in v3 form, paper App. A.2)."""
        lam, ts = lambda_grid(schedule, num_grid, t_range)
        z = np.zeros((len(lam),) + tuple(shape))
        return cls(lam, ts, z + 1.0, z, z, metadata={"degenerated": True, "num_grid": num_grid})

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save as safetensors (float64 tensors ``lambdas``, ``timesteps``, ``l``, ``s``, ``b``,
        ``l_d``) with the metadata as JSON in the safetensors header (key ``fewstep_ems``) and,
        for people, the same JSON next to it (``<path>.json`` with the suffix replaced)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"path must end with .safetensors, got {str(path)!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "lambdas": torch.from_numpy(self.lambdas.copy()),
            "timesteps": torch.from_numpy(self.timesteps.copy()),
            "l": torch.from_numpy(np.ascontiguousarray(self.l)),
            "s": torch.from_numpy(np.ascontiguousarray(self.s)),
            "b": torch.from_numpy(np.ascontiguousarray(self.b)),
        }
        if self.l_d is not None:
            tensors["l_d"] = torch.from_numpy(np.ascontiguousarray(self.l_d))
        meta = dict(jsonable(self.metadata))
        meta["format"] = EMS_FORMAT
        text = json.dumps(meta, sort_keys=True)
        # the tensors and their readable sidecar as one unit: both complete, then renamed
        with atomic_paths(path, path.with_suffix(".json")) as (tmp, tmp_json):
            save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
            tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EMS":
        """Load EMS saved by :meth:`save`; ``path`` may also name a shipped set (``"digits"``,
        ``"digits-cfg2"``) or a folder holding ``ems.safetensors``."""
        from safetensors import safe_open

        path = resolve_ems_path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta_text = (fh.metadata() or {}).get(METADATA_KEY)
                t = {k: fh.get_tensor(k) for k in fh.keys()} if meta_text is not None else {}
        except Exception as err:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ...
            raise ValueError(f"EMS file {str(path)!r} is unreadable (corrupt or truncated: {err}); delete it and "
                             "recompute it with 'fewstep ems', or copy it again") from err
        if meta_text is None:
            raise ValueError(f"{path} is not a fewstep EMS file (no {METADATA_KEY!r} metadata)")
        for k in ("lambdas", "timesteps", "l", "s", "b"):
            if k not in t:
                raise ValueError(f"{path} lacks the tensor {k!r}")
        try:
            meta = json.loads(meta_text)
        except json.JSONDecodeError as err:
            raise ValueError(f"EMS file {str(path)!r}: its {METADATA_KEY!r} metadata is not valid JSON "
                             f"(line {err.lineno}, column {err.colno}: {err.msg}); recompute it with 'fewstep ems'") \
                from None
        return cls(t["lambdas"].numpy(), t["timesteps"].numpy(), t["l"].numpy(), t["s"].numpy(), t["b"].numpy(),
                   l_d=t["l_d"].numpy() if "l_d" in t else None, metadata=meta)

    def __repr__(self) -> str:
        return (f"EMS(shape={self.shape}, num_grid={self.num_grid}, lambda=[{self.lambdas[0]:.3f}, "
                f"{self.lambdas[-1]:.3f}], K={self.metadata.get('num_samples')}, "
                f"guidance_scale={self.metadata.get('guidance_scale')})")


def resolve_ems_path(path: str | os.PathLike) -> Path:
    """A file path, a folder holding ``ems.safetensors``, or a shipped name (``digits``,
    ``digits-cfg2``) -> the EMS file path; ``FileNotFoundError`` naming what was looked for."""
    if isinstance(path, str) and path in SHIPPED:
        return shipped_file(SHIPPED[path])
    p = Path(path)
    if p.is_dir():
        p = p / "ems.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"EMS file {str(p)!r} not found (pass an EMS object, a .safetensors path, "
                                f"a folder with ems.safetensors, or one of {sorted(SHIPPED)})")
    return p


def lambda_grid(schedule: NoiseSchedule, num_grid: int, t_range: tuple[float, float] | None = None):
    """``num_grid + 1`` lambdas uniform between ``lambda(t_max)`` and ``lambda(t_min)`` (increasing)
    and their training-scale times. ``t_range = (t_min, t_max)`` defaults to the schedule's range."""
    if isinstance(num_grid, bool) or not isinstance(num_grid, (int, np.integer)) or num_grid < 2:
        raise ValueError(f"num_grid must be an int >= 2, got {num_grid!r}")
    t_min, t_max = (schedule.t_min, schedule.t_max) if t_range is None else map(float, t_range)
    if not t_min < t_max:
        raise ValueError(f"t_range must be (t_min, t_max) with t_min < t_max, got {t_range!r}")
    lam_lo, lam_hi = float(schedule.lambda_(t_max)), float(schedule.lambda_(t_min))
    if not (math.isfinite(lam_lo) and math.isfinite(lam_hi)):
        raise ValueError(f"t_range {t_min, t_max} reaches infinite lambda; pass a finite t_range")
    lam = np.linspace(lam_lo, lam_hi, int(num_grid) + 1)
    ts = np.asarray(schedule.t_of_lambda(lam), dtype=np.float64)
    ts[0], ts[-1] = t_max, t_min
    return lam, ts


# moved to fewstep.samplers.ems_estimate (estimation) and onto the schedule kinds (dlogalpha_dlambda)
__getattr__ = moved_names(
    __name__,
    {**{name: f"fewstep.samplers.ems_estimate:{name}" for name in ("jvp", "smooth_derivative", "schedule_config",
                                                                  "n_rows")},
     "compute_ems": "fewstep.samplers:compute_ems", "dlogalpha_dlambda": "fewstep.samplers._legacy:dlogalpha_dlambda"},
    {"dlogalpha_dlambda": "schedule.dlogalpha_dlambda(alpha, sigma), a method of every schedule kind"},
)
