"""Batched, optionally distributed feature extraction from an image source.

One pipeline serves every per-image metric: Inception features for FID/KID, the digits
classifier for FD-digits (features, plus logits for the accuracy) and CLIP score (the per-pair
score as a one-dimensional feature). An *extractor* is an ``nn.Module`` with

* ``prepare_fn()`` -> picklable callable: uint8 (3, H, W) image -> prepared tensor (runs in
  DataLoader workers, so images of different sizes are resized before batching);
* ``embed(batch)`` -> (B, D) features of a stacked batch of prepared tensors;
* ``num_features`` (D) and ``meta()`` (what statistics record: extractor, preprocessing);
* optionally ``embed_indexed(batch, index)`` -> ``(features, extra)``, called instead of
  ``embed`` with the (B,) source indices of the batch's images. It serves extractors that need
  per-image side information (CLIP looks up the prompt of image ``index[k]``) or give per-image
  outputs besides the features: ``extra`` is a (B, K) tensor or None, gathered in source order
  into :attr:`FeatureResult.extra` (the digits logits).

Features are returned as float32, or float64 when the extractor returns float64 (CLIP scores).

Under ``accelerate launch`` (or any ``torch.distributed`` group) rank r of W takes images r, r+W,
...; the float64 sums are all-reduced and features and extras gathered back in source order, so
results equal a single-process run (docs/evaluation.md, "Several GPUs or processes").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_path
from ..device import resolve_device
from .frechet import FeatureStats
from .images import BadImagesError, ImageSource, find_bad_images

__all__ = ["resolve_device", "extract_features", "check_images", "FeatureResult"]


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_objects(obj) -> list:
    rank, world = _dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _gather_in_order(idx: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Rows computed by every process for the source indices ``idx``, gathered on every process
    and sorted by index (source order); None when no process has any rows."""
    parts = [p for p in _all_gather_objects((idx, rows)) if p[1] is not None]
    if not parts:
        return None
    order = torch.argsort(torch.cat([p[0] for p in parts]))
    return torch.cat([p[1] for p in parts])[order]


def check_images(source: ImageSource, *, skip_bad: bool = False, progress: bool = False) -> list[tuple[str, str]]:
    """Check every image of ``source`` before any feature work; return the ``(name, reason)`` of
    its bad files (unreadable, not images, unsupported modes).

    Raises ValueError for an empty source and for one whose files are all bad, and
    :class:`BadImagesError` (a ValueError listing them) for bad files unless ``skip_bad``. Under
    ``torch.distributed`` each process checks its round-robin share and the lists are gathered, so
    every process agrees. The result is remembered on ``source``: :func:`extract_features` (and a
    second call) reuse it, so ``fewstep eval`` can check all its inputs first at no extra cost.
    """
    if len(source) == 0:
        raise ValueError(f"no images in {source.description}")
    rank, world = _dist_info()
    memo = source.__dict__.setdefault("_checked_bad", {})  # per (rank, world): a gather needs every rank
    bad = memo.get((rank, world))
    if bad is None:
        sub = source.subset(list(range(rank, len(source), world)))
        parts = _all_gather_objects(find_bad_images(sub, progress=progress and rank == 0))
        bad = memo[(rank, world)] = sorted(b for part in parts for b in part)
    if bad and not skip_bad:
        raise BadImagesError(source.description, bad)
    if len(bad) == len(source):
        shown = "; ".join(f"{n}: {r}" for n, r in bad[:3])
        raise ValueError(f"no readable images in {source.description}: all {len(bad)} file(s) are bad ({shown})")
    return list(bad)


def _embed(extractor, batch: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features, extra) of one batch on the CPU: ``embed_indexed`` when the extractor has it, else
    ``embed``; float64 output stays float64, anything else becomes float32."""
    hook = getattr(extractor, "embed_indexed", None)
    feats, extra = hook(batch, idx) if hook is not None else (extractor.embed(batch), None)

    def cpu(t):
        t = t.detach().cpu()
        return t if t.dtype == torch.float64 else t.float()

    return cpu(feats), None if extra is None else cpu(extra)


class _PreparedDataset(Dataset):
    def __init__(self, source: ImageSource, prepare, indices: list[int]):
        self.source, self.prepare, self.indices = source, prepare, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            return i, self.prepare(self.source.load(i)), ""
        except Exception as err:  # reported by name after the pass
            return i, None, f"{type(err).__name__}: {err}"


def _collate(items):
    ok = [(i, x) for i, x, e in items if not e]
    bad = [(i, e) for i, x, e in items if e]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    batch = torch.stack([x for _, x in ok]) if ok else None
    return idx, batch, bad


@dataclass
class FeatureResult:
    """Output of :func:`extract_features`.

    ``stats``: float64 running statistics over all processes. ``features``: (N, D) float32
    (float64 if the extractor returns float64) in source order (None unless ``keep_features``).
    ``names``: names of the images used, in order; ``indices``: their indices in the source.
    ``skipped``: ``(name, reason)`` of bad files that were skipped. ``extra``: (N, K) per-image
    extras of an ``embed_indexed`` extractor in source order (else None). ``per_process``: how
    many images each process embedded, in rank order (``[N]`` in a single process).
    """

    stats: FeatureStats
    features: torch.Tensor | None
    names: list[str]
    skipped: list[tuple[str, str]]
    extra: torch.Tensor | None = None
    indices: list[int] | None = None
    per_process: list[int] | None = None
    _checkpoint: "_Checkpoint | None" = field(default=None, repr=False, compare=False)

    def remove_checkpoint(self) -> None:
        """Delete the checkpoint that ``extract_features(..., keep_checkpoint=True)`` kept, once the
        results are stored safely. Under ``torch.distributed`` every process calls it; it first
        waits for all of them (so rank 0 has finished writing), then removes its own file."""
        if self._checkpoint is None:
            return
        _all_gather_objects(None)  # a barrier
        self._checkpoint.remove()
        self._checkpoint = None


def extract_features(
    source: ImageSource,
    extractor: torch.nn.Module,
    *,
    batch_size: int = 50,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    skip_bad: bool = False,
    keep_features: bool = False,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    keep_checkpoint: bool = False,
) -> FeatureResult:
    """Extract features of every image of ``source`` with ``extractor``.

    Bad files (unreadable, not images, unsupported modes) are collected by name first
    (:func:`check_images`): with ``skip_bad=False`` a :class:`BadImagesError` (a ValueError)
    listing them is raised before any feature work; with ``skip_bad=True`` they are skipped with a
    warning. An empty source, or one with no readable image, is a ValueError. ``device`` is "auto", "cpu" or
    "cuda"; ``num_workers`` DataLoader processes decode and resize. A tqdm bar shows progress
    on the main process. See the module docstring for the distributed behaviour.

    ``checkpoint``: a file where the running sums (and kept features) of this process's shard are
    saved every ``checkpoint_every`` batches (atomically; one file per rank, suffixed ``.rankN``,
    under several processes). If it exists when the call starts, the work resumes after the last
    saved batch, provided it was made for the same images, extractor and batch size (else a
    ValueError says to remove it); it is deleted once the features are complete. With
    ``keep_checkpoint=True`` it is instead completed and kept until the caller has stored the
    results and calls :meth:`FeatureResult.remove_checkpoint` (a kill while the caller writes its
    output then costs nothing: the rerun finishes at once).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    from tqdm.auto import tqdm

    rank, world = _dist_info()
    # 1. find bad files (sharded check, gathered so that every process agrees; reused if done before)
    bad = check_images(source, skip_bad=skip_bad, progress=progress)
    dev = resolve_device(device)
    extractor = extractor.to(dev)
    bad_names = {n for n, _ in bad}
    keep = [i for i in range(len(source)) if source.names[i] not in bad_names]

    # 2. features of this process's shard
    shard = keep[rank::world]
    loader = DataLoader(
        _PreparedDataset(source, extractor.prepare_fn(), shard),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
    )
    stats = FeatureStats(dim=int(extractor.num_features), meta=extractor.meta(),
                         origin=f"features of {source.description}")
    local_idx, local_feats, local_extra, late_bad = [], [], [], []
    ckpt = _Checkpoint(checkpoint, rank, world, checkpoint_every, shard, stats.meta, batch_size, keep_features)
    done = ckpt.restore(stats, local_idx, local_feats, local_extra, late_bad)
    if done:
        loader = DataLoader(
            _PreparedDataset(source, extractor.prepare_fn(), shard[done:]),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=dev.type == "cuda",
        )
    with tqdm(
        total=len(keep), initial=done * world, desc=f"features {source.description}", unit="img",
        disable=not progress or rank != 0,
    ) as bar:
        for idx, batch, bad_items in loader:
            late_bad += [(source.names[i], e) for i, e in bad_items]
            if batch is not None:
                feats, extra = _embed(extractor, batch.to(dev, non_blocking=True), idx)
                stats.update(feats)
                local_idx.append(idx)
                if keep_features:
                    local_feats.append(feats)
                if extra is not None:
                    local_extra.append(extra)
            bar.update(len(idx) * world + len(bad_items) * world)
            done += len(idx) + len(bad_items)
            ckpt.step(done, stats, local_idx, local_feats, local_extra, late_bad)

    local_late = late_bad
    parts = _all_gather_objects((local_late, stats.n))
    late_bad = [b for part, _ in parts for b in part]
    per_process = [n for _, n in parts]
    if late_bad and not skip_bad:
        # found only by decoding, after the pass: keep the finished work for the --skip-bad rerun
        note = ckpt.save(done, stats, local_idx, local_feats, local_extra, local_late)
        raise BadImagesError(source.description, sorted(late_bad), note)
    late_names = {n for n, _ in late_bad}
    if len(late_names) == len(keep):
        shown = "; ".join(f"{n}: {r}" for n, r in sorted(late_bad)[:3])
        raise ValueError(f"no readable images in {source.description}: all {len(keep)} file(s) failed to decode "
                         f"({shown})")
    skipped = sorted(bad + late_bad)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} bad file(s) in {source.description}", stacklevel=2)

    hold = keep_checkpoint and ckpt.path is not None
    if hold:  # this process's complete state (before the all-reduce): a rerun finishes at once
        ckpt.save(done, stats, local_idx, local_feats, local_extra, local_late)
    stats.all_reduce()
    idx = torch.cat(local_idx) if local_idx else torch.zeros(0, dtype=torch.long)
    features = None
    if keep_features:
        features = _gather_in_order(idx, torch.cat(local_feats) if local_feats else None)
        if features is None:
            features = torch.zeros(0, stats.dim)
    extra = _gather_in_order(idx, torch.cat(local_extra) if local_extra else None)
    used = [i for i in keep if source.names[i] not in late_names]
    if not hold:
        ckpt.remove()
    return FeatureResult(stats=stats, features=features, names=[source.names[i] for i in used], skipped=skipped,
                         extra=extra, indices=used, per_process=per_process, _checkpoint=ckpt if hold else None)


class _Checkpoint:
    """Resumable state of one process's shard in :func:`extract_features` (see ``checkpoint``)."""

    def __init__(self, path, rank, world, every, shard, meta, batch_size, keep_features):
        self.path = None if path is None else Path(f"{path}.rank{rank}" if world > 1 else path)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive int, got {every!r}")
        self.every, self.batches = every, 0
        self.key = {"shard": list(shard), "meta": dict(meta), "batch_size": batch_size,
                    "keep_features": keep_features}

    def restore(self, stats, local_idx, local_feats, local_extra, late_bad) -> int:
        if self.path is None or not self.path.exists():
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as err:  # a damaged file: torch/pickle/zipfile raise many types
            raise ValueError(f"checkpoint {self.path} cannot be read ({type(err).__name__}: {err}); remove it to "
                             "start the feature pass over") from err
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise ValueError(f"checkpoint {self.path} was made for other images, another extractor or "
                             "batch size; remove it to start over")
        stats.n, stats.sum, stats.sum_outer = state["n"], state["sum"], state["sum_outer"]
        local_idx += state["idx"]
        local_feats += state["feats"]
        local_extra += state.get("extra", [])
        late_bad += state["late_bad"]
        return int(state["done"])

    def step(self, done, stats, local_idx, local_feats, local_extra, late_bad) -> None:
        self.batches += 1
        if self.path is not None and not self.batches % self.every:
            self.save(done, stats, local_idx, local_feats, local_extra, late_bad)

    def save(self, done, stats, local_idx, local_feats, local_extra, late_bad) -> str:
        """Write the state now (atomically: an interrupted save never corrupts the last checkpoint);
        returns a note for error messages saying where the work is kept ("" without a checkpoint)."""
        if self.path is None:
            return ""
        state = {"key": self.key, "done": done, "n": stats.n, "sum": stats.sum, "sum_outer": stats.sum_outer,
                 "idx": local_idx, "feats": local_feats, "extra": local_extra, "late_bad": late_bad}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        return f"the features computed so far are kept in {self.path} (a rerun continues from there)"

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()
