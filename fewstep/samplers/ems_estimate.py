"""Estimating DPM-Solver-v3's empirical model statistics: :func:`compute_ems`.

A short driver over named pieces: :class:`_Problem` (the model, the lambda grid and the data, fixed
for a run), :class:`_RunState` (the float64 sums and the checkpoint they are saved to after every
batch), :class:`_Shards` (which batches this process runs, and the sum across processes), pass 1
(``l`` by Hutchinson's estimator, :func:`_pass1_batch`), pass 2 (the moments of ``f`` and ``f^(1)``
for ``s, b``, :func:`_pass2_batch`) and :func:`_final_statistics`. Every random draw is seeded per
(pass, batch, grid chunk), so resumed and sharded runs reproduce an uninterrupted single-process run.
The estimators are described in docs/samplers-reference.md ("EMS internals").
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_path, read_checkpoint
from ..schedule import NoiseSchedule, to_x0_eps
from .ems import EMS, jsonable, lambda_grid


# ------------------------------------------------------------------------------------------------
# small numerics
# ------------------------------------------------------------------------------------------------
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


def schedule_config(config: Mapping[str, Any]) -> dict:
    """The schedule-defining subset of a diffusers scheduler config (what EMS depend on)."""
    keys = (
        "_class_name", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
        "rescale_betas_zero_snr", "prediction_type", "use_flow_sigmas", "flow_shift", "shift", "sigma_min",
        "sigma_max", "schedule_kind",
    )
    return {k: jsonable(config[k]) for k in keys if k in config}


def n_rows(k_total: int, batch_size: int, n_batches: int) -> int:
    """Number of samples covered by the first ``n_batches`` batches."""
    return min(k_total, n_batches * batch_size)


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


def _bcast(v, ref):
    return v.reshape((-1,) + (1,) * (ref.ndim - 1))


# ------------------------------------------------------------------------------------------------
# the pieces of a run
# ------------------------------------------------------------------------------------------------
class _Problem:
    """What a run estimates on: the model's raw output (CFG-combined when guided), the lambda grid
    with its ``alpha``, ``sigma``, ``d log alpha / d lambda``, and the data in batches."""

    def __init__(self, model, schedule: NoiseSchedule, ptype: str, lam, ts, x_data, labels, cond, uncond,
                 guidance_scale, batch_size, chunk, seed, fd_step, jvp_mode, dtype, device):
        self.model, self.schedule, self.ptype = model, schedule, ptype
        self.lam, self.ts = lam, ts
        self.alphas = np.asarray(schedule.alpha(ts), dtype=np.float64)
        self.sigmas = np.asarray(schedule.sigma(ts), dtype=np.float64)
        self.dloga = schedule.dlogalpha_dlambda(self.alphas, self.sigmas)
        self.x_data, self.labels, self.cond, self.uncond = x_data, labels, cond, uncond
        self.guided = guidance_scale is not None and float(guidance_scale) != 1.0
        self.guidance_scale = guidance_scale
        self.shape = tuple(x_data.shape[1:])
        self.batch_size, self.chunk, self.seed = batch_size, chunk, seed
        self.fd_step, self.jvp_mode, self.dtype, self.device = fd_step, jvp_mode, dtype, device

    def eps(self, x, t_rows, a_rows, s_rows, c):
        """The noise prediction at rows ``x`` (times, alphas, sigmas per row)."""
        if self.guided:
            from ..guidance import cfg_combine  # guidance sits above the samplers in the import graph

            out = cfg_combine(self.model(x, t_rows, c), self.model(x, t_rows, self.uncond), float(self.guidance_scale))
        else:
            out = self.model(x, t_rows, c)
        return to_x0_eps(out, x, a_rows, s_rows, self.ptype)[1]

    def chunks(self):
        """Grid indices in groups of ``chunk`` (one model call covers a group times a batch)."""
        n_pts = len(self.lam)
        for j0 in range(0, n_pts, self.chunk):
            yield np.arange(j0, min(n_pts, j0 + self.chunk))

    def rows(self, arr, idx, b):
        """Per-row ``(G*B,)`` values of grid quantity ``arr`` at grid indices ``idx``."""
        return torch.from_numpy(np.repeat(arr[idx], b)).to(device=self.device, dtype=self.dtype)

    def draws(self, bi: int, b: int):
        """The random numbers of batch ``bi`` (``b`` samples): one noise ``z`` and one Rademacher probe
        ``v`` per data sample, from a generator seeded by (seed, batch), used at *every* grid point and
        in both passes (common random numbers). The Monte-Carlo error of ``l, s, b`` is then a smooth
        function of lambda; independent draws per grid point made the statistics rough in lambda and
        v3's error stopped falling with the number of steps (issue 10, docs/dpm-v3.md). Every draw of
        a run is made here."""
        gen = torch.Generator().manual_seed(_seed(self.seed, bi))
        z = torch.randn((b,) + self.shape, generator=gen, dtype=torch.float64)
        v = torch.randint(0, 2, (b,) + self.shape, generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        return z, v

    def noised(self, bi: int, idx):
        """Batch ``bi`` forward-noised to the grid points ``idx`` (grid-point major rows,
        ``x = alpha x0 + sigma z`` with the batch's common ``z``): ``(x, c, t, alpha, sigma, v, b)``
        with the probes ``v`` repeated like ``x`` (see :meth:`draws`)."""
        lo, hi = bi * self.batch_size, min(len(self.x_data), (bi + 1) * self.batch_size)
        x0 = self.x_data[lo:hi]
        c = self.cond if self.labels is None else self.labels[lo:hi]
        b, g = x0.shape[0], len(idx)
        rep = (g,) + (1,) * len(self.shape)
        z, v = (u.repeat(rep) for u in self.draws(bi, b))
        a_r, s_r, t_r = self.rows(self.alphas, idx, b), self.rows(self.sigmas, idx, b), self.rows(self.ts, idx, b)
        x = _bcast(a_r.double(), z) * x0.repeat(rep) + _bcast(s_r.double(), z) * z
        cc = _repeat_cond(c, b, g)
        if isinstance(cc, torch.Tensor):
            cc = cc.to(self.device)
        return x, cc, t_r, a_r, s_r, v, b

    def reduce_rows(self, u: torch.Tensor, g: int, b: int) -> np.ndarray:
        """Sum per-row values ``(G*B, ...)`` over the batch: ``(G, ...)`` float64."""
        return u.double().cpu().reshape((g, b) + self.shape).sum(1).numpy()


class _RunState:
    """The float64 sums of both passes (a plain dict, as saved), resumed from and saved atomically to
    ``checkpoint`` (per rank when sharded) after every batch."""

    def __init__(self, settings: dict, n_pts: int, shape: tuple, checkpoint, rank: int, world: int):
        zeros = lambda: np.zeros((n_pts,) + shape)  # noqa: E731
        self.data = {"settings": settings, "pass": 1, "done": [], "sum_l": zeros(), "sum_a": zeros(),
                     "sum_b": zeros(), "sum_aa": zeros(), "sum_ab": zeros(), "l": None, "l_d": None}
        self.path = None
        if checkpoint is not None:
            self.path = Path(checkpoint)
            if world > 1:
                self.path = self.path.with_name(f"{self.path.name}.rank{rank}")
            if self.path.exists():
                saved = read_checkpoint(self.path, lambda f: torch.load(f, map_location="cpu", weights_only=False))
                if not isinstance(saved, dict) or saved.get("settings") != settings:
                    raise ValueError(f"checkpoint {str(self.path)!r} was written with different settings; delete it "
                                     "or pass another checkpoint path")
                self.data = saved

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value

    def save(self) -> None:
        """Write the state to the checkpoint (temp file + ``os.replace``); no-op without one."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(self.data, tmp)


class _Shards:
    """Round-robin batches across the processes of an ``accelerate.Accelerator`` and the sum of
    an array across them (one process: everything, unchanged)."""

    def __init__(self, accelerator, n_batches: int):
        self.accelerator = accelerator
        self.rank, self.world = 0, 1
        if accelerator is not None:
            self.rank, self.world = int(accelerator.process_index), int(accelerator.num_processes)
        self.batches = [bi for bi in range(n_batches) if bi % self.world == self.rank]

    def reduce(self, arr: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return arr
        t = torch.from_numpy(arr).to(self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").cpu().numpy()


def _pass1_batch(pb: _Problem, bi: int, state: _RunState, tick: Callable[[], None]) -> None:
    """Pass 1 on batch ``bi``: ``sum_l += sigma (d eps/dx v) * v`` with Rademacher probes ``v``
    (Hutchinson's diagonal estimator of ``l* = E[diag(sigma d eps/dx)]``, paper Eq. 58)."""
    for idx in pb.chunks():
        x, cc, t_r, a_r, s_r, v, b = pb.noised(bi, idx)
        g = len(idx)
        x, v = x.to(device=pb.device, dtype=pb.dtype), v.to(device=pb.device, dtype=pb.dtype)
        with torch.no_grad():
            _, jv = jvp(lambda xx: pb.eps(xx, t_r, a_r, s_r, cc), x, v, pb.jvp_mode)
        state["sum_l"][idx] += pb.reduce_rows(_bcast(s_r, jv) * jv * v, g, b)
        tick()


def _eps_lambda_derivative(pb: _Problem, x, lam_r, cc):
    """``d eps / d lambda`` at fixed ``x``: a central difference of step ``fd_step`` in lambda
    (one-sided at the ends of the schedule's lambda range, where ``t(lambda)`` is clamped)."""
    sched = pb.schedule
    lam_ends = sched.lambda_range
    lam_pm = (np.minimum(lam_r + pb.fd_step, lam_ends[1]), np.maximum(lam_r - pb.fd_step, lam_ends[0]))
    span = _bcast(torch.from_numpy(lam_pm[0] - lam_pm[1]).to(pb.device), x)

    def tt(arr):
        return torch.from_numpy(np.asarray(arr, dtype=np.float64)).to(device=pb.device, dtype=pb.dtype)

    d_eps = 0
    for sign, lam_p in zip((1.0, -1.0), lam_pm):
        t_p = np.asarray(sched.t_of_lambda(lam_p), dtype=np.float64)
        a_p, s_p = np.asarray(sched.alpha(t_p)), np.asarray(sched.sigma(t_p))
        d_eps = d_eps + sign * pb.eps(x, tt(t_p), tt(a_p), tt(s_p), cc).double()
    return d_eps / span


def _pass2_batch(pb: _Problem, bi: int, state: _RunState, tick: Callable[[], None]) -> None:
    """Pass 2 on batch ``bi``: sums of ``f = (sigma eps - l x)/alpha``, its total lambda derivative
    ``f^(1) = e^{-lambda}((l - 1) eps + eps^(1)) - (dl/dlambda) y`` along the ODE, ``f^2`` and
    ``f f^(1)`` (for ``s = Cov(f, f^(1))/Var(f)``, ``b = E[f^(1)] - s E[f]``, paper Eq. 60-61)."""
    l_arr, ld_arr = state["l"], state["l_d"]
    for idx in pb.chunks():
        x, cc, t_r, a_r, s_r, _, b = pb.noised(bi, idx)
        g = len(idx)
        x = x.to(device=pb.device, dtype=pb.dtype)
        lam_r = np.repeat(pb.lam[idx], b)
        with torch.no_grad():
            eps = pb.eps(x, t_r, a_r, s_r, cc)
            d_eps_dlam = _eps_lambda_derivative(pb, x, lam_r, cc)
        # dx/dlambda = (d log alpha / d lambda) x - sigma eps along the ODE
        dxdl = _bcast(pb.rows(pb.dloga, idx, b), x) * x - _bcast(s_r, x) * eps
        with torch.no_grad():
            _, jv = jvp(lambda xx: pb.eps(xx, t_r, a_r, s_r, cc), x, dxdl.to(pb.dtype), pb.jvp_mode)
        eps64, x64 = eps.double(), x.double()
        eps1 = jv.double() + d_eps_dlam
        l_r = torch.from_numpy(np.repeat(l_arr[idx], b, axis=0)).to(pb.device)
        ld_r = torch.from_numpy(np.repeat(ld_arr[idx], b, axis=0)).to(pb.device)
        a64, s64 = _bcast(a_r.double(), x64), _bcast(s_r.double(), x64)
        e_mlam = _bcast(torch.from_numpy(np.exp(-lam_r)).to(pb.device), x64)
        f = (s64 * eps64 - l_r * x64) / a64
        f1 = e_mlam * ((l_r - 1.0) * eps64 + eps1) - ld_r * x64 / a64
        for key, value in (("sum_a", f), ("sum_b", f1), ("sum_aa", f * f), ("sum_ab", f * f1)):
            state[key][idx] += value.cpu().reshape((g, b) + pb.shape).sum(1).numpy()
        tick()


def _final_statistics(state: _RunState, shards: _Shards, k_used: int) -> tuple[np.ndarray, np.ndarray]:
    """``s = Cov(f, f^(1)) / Var(f)`` and ``b = E[f^(1)] - s E[f]`` per dimension from the summed
    moments (``s = 0`` where ``f`` is constant, where any ``s`` fits)."""
    mean_a = shards.reduce(state["sum_a"]) / k_used
    mean_b = shards.reduce(state["sum_b"]) / k_used
    mean_aa = shards.reduce(state["sum_aa"]) / k_used
    mean_ab = shards.reduce(state["sum_ab"]) / k_used
    var = mean_aa - mean_a**2
    cov = mean_ab - mean_a * mean_b
    tiny = 1e-12 * np.maximum(mean_aa, 1e-300)
    degenerate_var = var <= tiny
    if np.any(degenerate_var):
        var = np.where(degenerate_var, 1.0, var)
    s_arr = np.where(degenerate_var, 0.0, cov / var)
    return s_arr, mean_b - s_arr * mean_a


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------
def compute_ems(
    model: Callable,
    scheduler_config: Mapping[str, Any],
    data,
    num_grid: int = 200,
    num_samples: int | None = None,
    batch_size: int = 256,
    t_range: tuple[float, float] | None = None,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float | None = None,
    prediction_type: str | None = None,
    pairs_per_call: int = 4096,
    smoothing_window: int = 0,
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
        num_grid: number of lambda intervals ``N`` (paper: 1200 for pixel models, 120-250 latent). With
            common random numbers N = 200 measured as N = 400 on exact mixtures (N = 100 loses 10-25% at
            15-30 steps, N = 50 levels off); ``K = 512`` to ``8192`` samples gave the same errors
            (docs/dpm-v3.md, "Defaults").
        num_samples: ``K``, samples used (default: all of ``data``).
        batch_size: data samples per batch (the unit of checkpointing and sharding).
        t_range: ``(t_min, t_max)`` training-scale times of the grid ends (default: the schedule's).
        cond, uncond, guidance_scale: condition (used when ``data`` has no labels), the
            unconditional condition, and the CFG scale ``w`` (``uncond + w (cond - uncond)`` on the
            raw output; ``None`` or 1: conditional model only). EMS depend on the scale
            (paper App. J.2).
        pairs_per_call: (sample, grid point) pairs evaluated in one model call.
        smoothing_window: half-width (in grid points) of the moving average applied to ``dl/dlambda``
            (the paper and official code: 5). 0 by default: with common random numbers ``l`` is smooth
            in lambda, and a window of +-5 points biases ``b`` where the grid is coarse in lambda (on
            the DDPM linear schedule at N = 200 it cost 1.6x the error at 15-30 steps; docs/dpm-v3.md).
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
    _check_arguments(batch_size, pairs_per_call, fd_step, num_samples, guidance_scale)
    lam, ts = lambda_grid(schedule, num_grid, t_range)
    x_data, labels = _collect(data, num_samples, torch.Generator().manual_seed(int(seed)))
    x_data = x_data.to(torch.float64).cpu()
    k_total = x_data.shape[0]
    n_batches = math.ceil(k_total / batch_size)
    if _max_batches is not None:
        n_batches = min(n_batches, _max_batches)
    chunk = max(1, pairs_per_call // min(batch_size, k_total))
    shards = _Shards(accelerator, n_batches)
    if device is not None:
        device = torch.device(device)
    else:
        device = accelerator.device if accelerator is not None else torch.device("cpu")
    pb = _Problem(model, schedule, ptype, lam, ts, x_data, labels, cond, uncond, guidance_scale, batch_size, chunk,
                  seed, fd_step, jvp_mode, dtype, device)
    settings = {
        "schedule": schedule_config(cfg), "num_grid": int(num_grid), "t_range": [float(ts[-1]), float(ts[0])],
        "lambda_range": [float(lam[0]), float(lam[-1])], "num_samples": int(k_total), "batch_size": int(batch_size),
        "guidance_scale": None if guidance_scale is None else float(guidance_scale), "prediction_type": ptype,
        "seed": int(seed), "smoothing_window": int(smoothing_window), "fd_step": float(fd_step),
        "chunk": int(chunk), "noise": "common", "model_id": model_id,
        "conditional": labels is not None or cond is not None,
        "data_digest": hashlib.sha256(x_data[: min(k_total, 64)].numpy().tobytes()).hexdigest()[:16],
    }
    state = _RunState(settings, len(lam), pb.shape, checkpoint, shards.rank, shards.world)
    k_used = n_rows(k_total, batch_size, n_batches)
    n_chunks = math.ceil(len(lam) / chunk)
    for p, run_batch in ((1, _pass1_batch), (2, _pass2_batch)):
        if state["pass"] > p:
            continue
        todo = [bi for bi in shards.batches if bi not in state["done"]]
        bar = tqdm(total=len(shards.batches) * n_chunks, initial=(len(shards.batches) - len(todo)) * n_chunks,
                   disable=not (progress and shards.rank == 0), desc=f"EMS pass {p}/2 ({'l' if p == 1 else 's, b'})")
        for bi in todo:
            run_batch(pb, bi, state, lambda: bar.update(1))
            state["done"].append(bi)
            state.save()
        bar.close()
        if p == 1:
            state["l"] = shards.reduce(state["sum_l"]) / k_used
            state["l_d"] = smooth_derivative(state["l"], lam, smoothing_window)
        state["pass"] = p + 1
        state["done"] = []
        state.save()

    s_arr, b_arr = _final_statistics(state, shards, k_used)
    meta = dict(settings)
    meta.update({"num_samples": int(k_used), "seconds": round(time.perf_counter() - t_start, 3),
                 "world_size": shards.world,
                 "estimators": "l: Hutchinson (Rademacher) JVP; s,b: per-dimension least squares"})
    meta.pop("data_digest", None)
    return EMS(lam, ts, state["l"], s_arr, b_arr, l_d=state["l_d"], metadata=meta)


def _check_arguments(batch_size, pairs_per_call, fd_step, num_samples, guidance_scale) -> None:
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
