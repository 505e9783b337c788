"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023,
"DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics", arXiv 2310.13268).

Conventions (fewstep-wide, see :mod:`fewstep.schedule`): ``x = alpha x0 + sigma eps``, half
log-SNR ``lambda = log(alpha/sigma)``, ``y = x / alpha``. The probability-flow ODE in ``y`` is
``dy/dlambda = -e^{-lambda} eps_theta`` for every schedule kind (VP, flow, EDM). DPM-Solver-v3
(paper Eq. 6-9) rewrites it with three per-dimension coefficients on a grid uniform in lambda:

* ``l_lambda`` (paper Eq. 7/58): linear part; ``N = sigma eps - l x`` has minimal expected
  Jacobian norm. Optimum ``l* = E[diag(sigma d eps/dx)]``, estimated with Hutchinson's diagonal
  estimator ``E_v[(sigma (d eps/dx) v) * v]``, ``v`` Rademacher, one JVP per sample.
* ``s_lambda``, ``b_lambda`` (paper Eq. 8, 60-61): per-dimension least squares of
  ``f^(1) ~ s f + b`` with ``f = N/alpha = (sigma eps - l x)/alpha`` and its total lambda
  derivative along the ODE ``f^(1) = e^{-lambda}((l - 1) eps + eps^(1)) - (dl/dlambda) y``,
  ``eps^(1) = d eps/dlambda`` along ``dx/dlambda = (d alpha/dlambda) y - sigma eps``:
  ``s = Cov(f, f^(1)) / Var(f)``, ``b = E[f^(1)] - s E[f]``.

The solver needs, besides ``l, s, b``, the cumulative integrals (paper Eq. 9 and App. B;
``lambda_0`` = first grid point, the noisiest): ``L = int l``, ``S = int s``, ``B = int e^{-S} b``,
all by the trapezoid rule on the grid, and the step weights relative to the step's start
``lambda_i`` (overflow-free: absolute integrals of ``e^{L+S}`` exceed float64 on wide ranges):
``E_k(i, j) = int_{lambda_i}^{lambda_j} e^{(L+S)(lambda) - (L+S)(lambda_i)} (lambda - lambda_i)^k / k!
dlambda`` and ``int_{lambda_i}^{lambda_j} e^{(L+S)(lambda) - (L+S)(lambda_i)} (B(lambda) - B(lambda_i))
dlambda``.

:func:`compute_ems` estimates ``l, s, b`` from forward-noised data (or model samples) with
streaming float64 accumulators, checkpoint/resume, sharding across accelerate processes and a
progress bar; :class:`EMS` holds the result and saves/loads it as safetensors with JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from ..schedule import NoiseSchedule, to_x0_eps

EMS_FORMAT = "fewstep-ems-v1"
METADATA_KEY = "fewstep_ems"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "models" / "weights"
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


def smooth_derivative(values: np.ndarray, lambdas: np.ndarray, window: int = 5) -> np.ndarray:
    """``d values / d lambda`` on a uniform lambda grid: central differences (one-sided at the
    ends), then a centred moving average over ``2 * window + 1`` points (shrinking at the ends),
    as the paper does for ``dl/dlambda`` (App. C.1.1; the official scripts smooth over +-5 points).
    ``window = 0`` disables smoothing."""
    d = np.gradient(values, lambdas, axis=0)
    if window <= 0:
        return d
    n = len(d)
    csum = np.concatenate([np.zeros_like(d[:1]), np.cumsum(d, axis=0)], axis=0)
    out = np.empty_like(d)
    for j in range(n):
        lo, hi = max(0, j - window), min(n, j + window + 1)
        out[j] = (csum[hi] - csum[lo]) / (hi - lo)
    return out


def dlogalpha_dlambda(schedule: NoiseSchedule, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``d log(alpha) / d lambda``: ``sigma^2`` for VP (``alpha^2 + sigma^2 = 1``), ``sigma`` for
    flow matching (``alpha = sigmoid(lambda)``), ``0`` for EDM/VE (``alpha = 1``)."""
    if schedule.kind == "discrete":
        return sigma**2
    if schedule.kind == "flow":
        return sigma / (alpha + sigma)
    return np.zeros_like(sigma)


def _jsonable(value):
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def schedule_config(config: Mapping[str, Any]) -> dict:
    """The schedule-defining subset of a diffusers scheduler config (what EMS depend on)."""
    keys = (
        "_class_name", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
        "rescale_betas_zero_snr", "prediction_type", "use_flow_sigmas", "flow_shift", "shift", "sigma_min",
        "sigma_max", "schedule_kind",
    )
    return {k: _jsonable(config[k]) for k in keys if k in config}


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
        meta = dict(_jsonable(self.metadata))
        meta["format"] = EMS_FORMAT
        text = json.dumps(meta, sort_keys=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EMS":
        """Load EMS saved by :meth:`save`; ``path`` may also name a shipped set (``"digits"``,
        ``"digits-cfg2"``) or a folder holding ``ems.safetensors``."""
        from safetensors import safe_open

        path = resolve_ems_path(path)
        with safe_open(str(path), framework="pt") as fh:
            meta_text = (fh.metadata() or {}).get(METADATA_KEY)
            if meta_text is None:
                raise ValueError(f"{path} is not a fewstep EMS file (no {METADATA_KEY!r} metadata)")
            t = {k: fh.get_tensor(k) for k in fh.keys()}
        for k in ("lambdas", "timesteps", "l", "s", "b"):
            if k not in t:
                raise ValueError(f"{path} lacks the tensor {k!r}")
        meta = json.loads(meta_text)
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
        p = WEIGHTS_DIR / SHIPPED[path]
        if not p.exists():
            raise FileNotFoundError(f"the shipped EMS {path!r} ({p}) is not installed")
        return p
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


# ------------------------------------------------------------------------------------------------
# Jacobian-vector products
# ------------------------------------------------------------------------------------------------
def jvp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor, mode: str = "auto"):
    """``(fn(x), J_fn(x) v)``. ``mode``: ``"forward"`` (``torch.func.jvp``, forward-mode AD),
    ``"backward"`` (``torch.autograd.functional.jvp``: the double-backward trick, for models
    without forward-AD support, as the paper does for EDM, App. D.2), ``"auto"`` (forward, falling
    back to backward on an error)."""
    if mode not in ("auto", "forward", "backward"):
        raise ValueError(f"jvp mode={mode!r} is not supported; allowed: 'auto', 'forward', 'backward'")
    if mode in ("auto", "forward"):
        try:
            return torch.func.jvp(fn, (x,), (v,))
        except (RuntimeError, NotImplementedError, TypeError):
            if mode == "forward":
                raise
    with torch.enable_grad():
        out, tangent = torch.autograd.functional.jvp(fn, x, v)
    return out.detach(), tangent.detach()


# ------------------------------------------------------------------------------------------------
# data handling
# ------------------------------------------------------------------------------------------------
def _collect(data, num_samples: int | None, generator: torch.Generator):
    """Turn ``data`` into ``(x0, labels or None)`` with at most ``num_samples`` rows."""
    labels = None
    if callable(data) and not isinstance(data, torch.Tensor):
        if num_samples is None:
            raise ValueError("num_samples must be given when data is a callable")
        data = data(int(num_samples), generator)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) \
            and isinstance(data[1], torch.Tensor) and data[0].shape[0] == data[1].shape[0] and data[1].ndim == 1:
        data, labels = data
    if isinstance(data, torch.Tensor):
        x = data
    else:
        xs, ys, n = [], [], 0
        if not isinstance(data, Iterable):
            raise TypeError(f"data must be a tensor, a (tensor, labels) pair, an iterable of batches or a callable, "
                            f"got {type(data).__name__}")
        for item in data:
            if isinstance(item, (tuple, list)):
                xs.append(item[0])
                if len(item) > 1 and isinstance(item[1], torch.Tensor):
                    ys.append(item[1])
            else:
                xs.append(item)
            n += xs[-1].shape[0]
            if num_samples is not None and n >= num_samples:
                break
        if not xs:
            raise ValueError("data is empty")
        x = torch.cat(xs)
        labels = torch.cat(ys) if len(ys) == len(xs) else None
    if x.ndim < 2:
        raise ValueError(f"data must have a batch dimension, got shape {tuple(x.shape)}")
    if num_samples is not None:
        if x.shape[0] < num_samples:
            raise ValueError(f"num_samples={num_samples} but data holds only {x.shape[0]} samples")
        x = x[:num_samples]
        labels = None if labels is None else labels[:num_samples]
    return x, labels


def _repeat_cond(c, b: int, g: int):
    """Repeat a per-sample condition (tensor with leading dim ``b``) for ``g`` grid points."""
    if isinstance(c, torch.Tensor) and c.ndim >= 1 and c.shape[0] == b:
        return c.repeat((g,) + (1,) * (c.ndim - 1))
    return c


def _seed(*parts: int) -> int:
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:7], "little")


# ------------------------------------------------------------------------------------------------
# compute_ems
# ------------------------------------------------------------------------------------------------
def compute_ems(
    model: Callable,
    scheduler_config: Mapping[str, Any],
    data,
    num_grid: int = 1200,
    num_samples: int | None = None,
    batch_size: int = 256,
    t_range: tuple[float, float] | None = None,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float | None = None,
    prediction_type: str | None = None,
    pairs_per_call: int = 4096,
    smoothing_window: int = 5,
    fd_step: float = 1e-3,
    jvp_mode: str = "auto",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | None = None,
    accelerator=None,
    model_id: str | None = None,
    progress: bool = True,
    _max_batches: int | None = None,
) -> EMS:
    """Estimate DPM-Solver-v3's empirical model statistics (paper Sec. 3.1, Eq. 7-8; closed forms
    App. C.1.1 Eq. 58-61) for ``model`` on a grid of ``num_grid + 1`` points uniform in lambda.

    Args:
        model: ``model(x, t, c) -> raw output`` of type ``prediction_type`` (fewstep convention;
            ``t`` is a per-row tensor of training-scale times).
        scheduler_config: the model's diffusers scheduler config (defines the noise schedule and,
            unless ``prediction_type`` is given, the output type).
        data: clean samples ``x0`` (latents for latent models) to forward-noise: a tensor
            ``(K, ...)``, a ``(tensor, labels)`` pair (labels become per-sample conditions), an
            iterable of tensors or ``(x, labels)`` batches, or a callable ``data(n, generator)``
            returning ``n`` samples (e.g. model samples at the target guidance scale, as the paper
            does for Stable Diffusion, App. D.5).
        num_grid: number of lambda intervals ``N`` (paper: 1200 for pixel models, 120-250 latent).
        num_samples: ``K``, samples used (default: all of ``data``).
        batch_size: data samples per batch (the unit of checkpointing and sharding).
        t_range: ``(t_min, t_max)`` training-scale times of the grid ends (default: the schedule's).
        cond, uncond, guidance_scale: condition (used when ``data`` has no labels), the
            unconditional condition, and the CFG scale ``w`` (``uncond + w (cond - uncond)`` on the
            raw output; ``None`` or 1: conditional model only). EMS depend on the scale
            (paper App. J.2).
        pairs_per_call: (sample, grid point) pairs evaluated in one model call.
        smoothing_window: half-width of the moving average applied to ``dl/dlambda``.
        fd_step: lambda step of the central difference used for the explicit time dependence
            ``d eps/dlambda |_x`` (the ``x`` dependence uses a JVP). Model times are read through the
            schedule's tables, which forward AD cannot see, hence the difference quotient.
        jvp_mode: ``"auto"`` | ``"forward"`` | ``"backward"`` (see :func:`jvp`).
        seed: seed of the noise and Rademacher probes. Each data sample gets one noise ``z`` and one
            probe ``v``, shared by all grid points (``x_lambda = alpha x0 + sigma z``): the estimates
            are then smooth functions of lambda, which the solver's order needs (docs/dpm-v3.md).
            Deterministic per batch, so resumed and sharded runs reproduce an uninterrupted run.
        dtype, device: of the model inputs (accumulators are float64).
        checkpoint: file to save progress to after every batch; an existing one with the same
            settings is resumed.
        accelerator: an ``accelerate.Accelerator``: batches are sharded round-robin across its
            processes and the sums reduced; every process returns the same EMS. The caller owns
            the process group: end the script with ``accelerator.end_training()`` (a gloo group
            left alive at exit aborts the process).
        model_id: free-form model identifier recorded in the metadata.
        progress: show tqdm bars (main process only).

    Returns:
        :class:`EMS` with metadata ``schedule``, ``num_grid``, ``t_range``, ``lambda_range``,
        ``num_samples``, ``guidance_scale``, ``model_id``, ``prediction_type``, ``seconds``.
    """
    t_start = time.perf_counter()
    cfg = dict(scheduler_config)
    schedule = NoiseSchedule.from_config(cfg)
    ptype = prediction_type or cfg.get("prediction_type", "epsilon")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if pairs_per_call < 1:
        raise ValueError(f"pairs_per_call must be >= 1, got {pairs_per_call}")
    if not fd_step > 0:
        raise ValueError(f"fd_step must be > 0, got {fd_step}")
    if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) < 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if guidance_scale is not None and not math.isfinite(float(guidance_scale)):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    guided = guidance_scale is not None and float(guidance_scale) != 1.0
    lam, ts = lambda_grid(schedule, num_grid, t_range)
    alphas = np.asarray(schedule.alpha(ts), dtype=np.float64)
    sigmas = np.asarray(schedule.sigma(ts), dtype=np.float64)
    dloga = dlogalpha_dlambda(schedule, alphas, sigmas)

    gen = torch.Generator().manual_seed(int(seed))
    x_data, labels = _collect(data, num_samples, gen)
    x_data = x_data.to(torch.float64).cpu()
    k_total = x_data.shape[0]
    shape = tuple(x_data.shape[1:])
    n_pts = len(lam)
    n_batches = math.ceil(k_total / batch_size)
    if _max_batches is not None:
        n_batches = min(n_batches, _max_batches)
    chunk = max(1, pairs_per_call // min(batch_size, k_total))

    rank, world = 0, 1
    if accelerator is not None:
        rank, world = int(accelerator.process_index), int(accelerator.num_processes)
    main = rank == 0
    if device is not None:
        device = torch.device(device)
    else:
        device = accelerator.device if accelerator is not None else torch.device("cpu")

    settings = {
        "schedule": schedule_config(cfg), "num_grid": int(num_grid), "t_range": [float(ts[-1]), float(ts[0])],
        "lambda_range": [float(lam[0]), float(lam[-1])], "num_samples": int(k_total), "batch_size": int(batch_size),
        "guidance_scale": None if guidance_scale is None else float(guidance_scale), "prediction_type": ptype,
        "seed": int(seed), "smoothing_window": int(smoothing_window), "fd_step": float(fd_step),
        "chunk": int(chunk), "noise": "common", "model_id": model_id,
        "conditional": labels is not None or cond is not None,
        "data_digest": hashlib.sha256(x_data[: min(k_total, 64)].numpy().tobytes()).hexdigest()[:16],
    }

    def raw(x, t, c):
        if not guided:
            return model(x, t, c)
        out_c = model(x, t, c)
        out_u = model(x, t, uncond)
        return out_u + float(guidance_scale) * (out_c - out_u)

    def eps_of(x, t_rows, a_rows, s_rows, c):
        out = raw(x, t_rows, c)
        return to_x0_eps(out, x, a_rows, s_rows, ptype)[1]

    # ---- state (float64 sums), checkpoint ------------------------------------------------------
    zeros = lambda: np.zeros((n_pts,) + shape)  # noqa: E731
    state = {"settings": settings, "pass": 1, "done": [], "sum_l": zeros(), "sum_a": zeros(), "sum_b": zeros(),
             "sum_aa": zeros(), "sum_ab": zeros(), "l": None, "l_d": None}
    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if world > 1:
            ckpt = ckpt.with_name(f"{ckpt.name}.rank{rank}")
        if ckpt.exists():
            saved = torch.load(ckpt, map_location="cpu", weights_only=False)
            if saved.get("settings") != settings:
                raise ValueError(f"checkpoint {str(ckpt)!r} was written with different settings; delete it or "
                                 "pass another checkpoint path")
            state = saved

    def save_state():
        if ckpt is None:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt)

    def reduce(arr: np.ndarray) -> np.ndarray:
        if world == 1:
            return arr
        t = torch.from_numpy(arr).to(accelerator.device)
        return accelerator.reduce(t, reduction="sum").cpu().numpy()

    my_batches = [bi for bi in range(n_batches) if bi % world == rank]

    def batch_rows(bi):
        lo, hi = bi * batch_size, min(k_total, (bi + 1) * batch_size)
        x0 = x_data[lo:hi]
        c = cond if labels is None else labels[lo:hi]
        return x0, c

    def rows(arr, idx, b):  # per-row (G*B,) values of grid quantity arr at grid indices idx
        return torch.from_numpy(np.repeat(arr[idx], b)).to(device=device, dtype=dtype)

    def bcast(v, ref):
        return v.reshape((-1,) + (1,) * (ref.ndim - 1))

    # ---- pass 1: l by Hutchinson's diagonal estimator (paper Eq. 58) --------------------------
    def draws(bi, b):
        """The noise ``z`` and Rademacher probe ``v`` of batch ``bi``: one pair per data sample, used
        at *every* grid point (common random numbers), so the Monte-Carlo error of the estimates is a
        smooth function of lambda; independent draws per grid point made ``l, s, b`` rough in lambda
        and the solver stopped converging (issue 10, docs/dpm-v3.md)."""
        gg = torch.Generator().manual_seed(_seed(seed, bi))
        z = torch.randn((b,) + shape, generator=gg, dtype=torch.float64)
        v = torch.randint(0, 2, (b,) + shape, generator=gg, dtype=torch.int64).to(torch.float64) * 2 - 1
        return z, v

    def rep(u, g):  # (b, ...) -> (g * b, ...), grid-point major like rows()
        return u.repeat((g,) + (1,) * (u.ndim - 1))

    def pass1(bi):
        x0, c = batch_rows(bi)
        b = x0.shape[0]
        z1, v1 = draws(bi, b)
        for j0 in range(0, n_pts, chunk):
            idx = np.arange(j0, min(n_pts, j0 + chunk))
            g = len(idx)
            z, v = rep(z1, g), rep(v1, g)
            a_r, s_r, t_r = rows(alphas, idx, b), rows(sigmas, idx, b), rows(ts, idx, b)
            x = (bcast(a_r.double(), z) * rep(x0, g) + bcast(s_r.double(), z) * z)
            x, v = x.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
            cc = _repeat_cond(c, b, g)
            if isinstance(cc, torch.Tensor):
                cc = cc.to(device)
            with torch.no_grad():
                _, jv = jvp(lambda xx: eps_of(xx, t_r, a_r, s_r, cc), x, v, jvp_mode)
            est = (bcast(s_r, jv) * jv * v).double().cpu().reshape((g, b) + shape).sum(1).numpy()
            state["sum_l"][idx] += est
            bar.update(1)

    # ---- pass 2: f, f^(1) moments for s, b (paper Eq. 60-61) ----------------------------------
    def pass2(bi):
        x0, c = batch_rows(bi)
        b = x0.shape[0]
        l_arr, ld_arr = state["l"], state["l_d"]
        z1, _ = draws(bi, b)  # the same noised points as pass 1
        for j0 in range(0, n_pts, chunk):
            idx = np.arange(j0, min(n_pts, j0 + chunk))
            g = len(idx)
            z = rep(z1, g)
            a_r, s_r, t_r = rows(alphas, idx, b), rows(sigmas, idx, b), rows(ts, idx, b)
            x = bcast(a_r.double(), z) * rep(x0, g) + bcast(s_r.double(), z) * z
            x = x.to(device=device, dtype=dtype)
            cc = _repeat_cond(c, b, g)
            if isinstance(cc, torch.Tensor):
                cc = cc.to(device)
            lam_r = np.repeat(lam[idx], b)
            with torch.no_grad():
                eps = eps_of(x, t_r, a_r, s_r, cc)
                # explicit lambda dependence at fixed x: central difference in lambda
                # (one-sided at the ends of the schedule's lambda range, where t(lambda) is clamped)
                d_eps_dlam = 0
                lam_ends = (float(schedule.lambda_(schedule.t_max)), float(schedule.lambda_(schedule.t_min)))
                lam_pm = (np.minimum(lam_r + fd_step, lam_ends[1]), np.maximum(lam_r - fd_step, lam_ends[0]))
                span = bcast(torch.from_numpy(lam_pm[0] - lam_pm[1]).to(device), x)
                for sign, lam_p in zip((1.0, -1.0), lam_pm):
                    t_p = np.asarray(schedule.t_of_lambda(lam_p), dtype=np.float64)
                    a_p, s_p = np.asarray(schedule.alpha(t_p)), np.asarray(schedule.sigma(t_p))
                    tt = lambda arr: torch.from_numpy(np.asarray(arr, dtype=np.float64)).to(device=device, dtype=dtype)  # noqa: E731
                    d_eps_dlam = d_eps_dlam + sign * eps_of(x, tt(t_p), tt(a_p), tt(s_p), cc).double()
                d_eps_dlam = d_eps_dlam / span
            # dx/dlambda = (d log alpha / d lambda) x - sigma eps along the ODE
            dxdl = bcast(rows(dloga, idx, b), x) * x - bcast(s_r, x) * eps
            with torch.no_grad():
                _, jv = jvp(lambda xx: eps_of(xx, t_r, a_r, s_r, cc), x, dxdl.to(dtype), jvp_mode)
            eps64, x64 = eps.double(), x.double()
            eps1 = jv.double() + d_eps_dlam
            l_r = torch.from_numpy(np.repeat(l_arr[idx], b, axis=0)).to(device)
            ld_r = torch.from_numpy(np.repeat(ld_arr[idx], b, axis=0)).to(device)
            a64, s64 = bcast(a_r.double(), x64), bcast(s_r.double(), x64)
            e_mlam = bcast(torch.from_numpy(np.exp(-lam_r)).to(device), x64)
            f = (s64 * eps64 - l_r * x64) / a64
            f1 = e_mlam * ((l_r - 1.0) * eps64 + eps1) - ld_r * x64 / a64
            red = lambda u: u.cpu().reshape((g, b) + shape).sum(1).numpy()  # noqa: E731
            state["sum_a"][idx] += red(f)
            state["sum_b"][idx] += red(f1)
            state["sum_aa"][idx] += red(f * f)
            state["sum_ab"][idx] += red(f * f1)
            bar.update(1)

    n_chunks = math.ceil(n_pts / chunk)
    for p, fn in ((1, pass1), (2, pass2)):
        if state["pass"] > p:
            continue
        todo = [bi for bi in my_batches if bi not in state["done"]]
        bar = tqdm(total=len(my_batches) * n_chunks, initial=(len(my_batches) - len(todo)) * n_chunks,
                   disable=not (progress and main), desc=f"EMS pass {p}/2 ({'l' if p == 1 else 's, b'})")
        for bi in todo:
            fn(bi)
            state["done"].append(bi)
            save_state()
        bar.close()
        if p == 1:
            l_sum = reduce(state["sum_l"])
            state["l"] = l_sum / n_rows(k_total, batch_size, n_batches)
            state["l_d"] = smooth_derivative(state["l"], lam, smoothing_window)
        state["pass"] = p + 1
        state["done"] = []
        save_state()

    k_used = n_rows(k_total, batch_size, n_batches)
    mean_a = reduce(state["sum_a"]) / k_used
    mean_b = reduce(state["sum_b"]) / k_used
    mean_aa = reduce(state["sum_aa"]) / k_used
    mean_ab = reduce(state["sum_ab"]) / k_used
    var = mean_aa - mean_a**2
    cov = mean_ab - mean_a * mean_b
    tiny = 1e-12 * np.maximum(mean_aa, 1e-300)
    degenerate_var = var <= tiny
    if np.any(degenerate_var):  # f constant in a dimension: any s fits; take s = 0
        var = np.where(degenerate_var, 1.0, var)
    s_arr = np.where(degenerate_var, 0.0, cov / var)
    b_arr = mean_b - s_arr * mean_a
    meta = dict(settings)
    meta.update({"num_samples": int(k_used), "seconds": round(time.perf_counter() - t_start, 3),
                 "world_size": world, "estimators": "l: Hutchinson (Rademacher) JVP; s,b: per-dimension least squares"})
    meta.pop("data_digest", None)
    return EMS(lam, ts, state["l"], s_arr, b_arr, l_d=state["l_d"], metadata=meta)


def n_rows(k_total: int, batch_size: int, n_batches: int) -> int:
    """Number of samples covered by the first ``n_batches`` batches."""
    return min(k_total, n_batches * batch_size)
