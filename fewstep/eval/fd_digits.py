"""FD-digits: Frechet distance on the bundled digits classifier's features, plus accuracy.

:func:`fewstep.eval.frechet.frechet_distance` between the classifier's 128-d penultimate features
(``classifier.features(x)``) of generated digits and of the 360 held-out test digits
(``load_digits_split("test")``); with intended labels, also the classifier's accuracy (argmax of
the logits). Images (:func:`digits_prepare`): uint8 (or float in [0, 1], rounded), alpha
composited on white, averaged to grey, area-averaged to 8x8, mapped to [-1, 1] by
``x / 127.5 - 1``. :class:`DigitsFeatures` runs the same through the sharded
:func:`fewstep.eval.features.extract_features`, and :func:`fd_digits_from_stats` finishes it.
Guide: docs/evaluation.md, "FD-digits".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .frechet import FeatureStats, check_sample_size
from .preprocess import to_rgb, to_uint8

__all__ = [
    "digits_prepare",
    "DigitsFeatures",
    "load_classifier",
    "digits_reference_images",
    "fd_digits",
    "fd_digits_from_stats",
    "check_labels",
    "read_labels",
]

DIGITS_SIZE = 8
NUM_CLASSES = 10
_MISSING = (
    "the digits classifier is not available: fewstep.models.classifier.load_digits_classifier "
    "could not be imported (it ships with the digits teacher, issue 3)"
)


def digits_prepare(images: torch.Tensor) -> torch.Tensor:
    """Images -> float (B, 1, 8, 8) in [-1, 1] for the digits classifier (see module docstring).
    A single (C, H, W) image gives (1, 8, 8)."""
    single = images.ndim == 3
    x = to_uint8(images)
    x = x.unsqueeze(0) if single else x
    if x.ndim != 4 or x.shape[1] not in (1, 2, 3, 4):
        raise ValueError(f"images must be (B, C, H, W) with C in (1, 2, 3, 4), got {tuple(x.shape)}")
    if x.shape[-1] < DIGITS_SIZE or x.shape[-2] < DIGITS_SIZE:
        raise ValueError(f"digit images must be at least 8x8, got {tuple(x.shape[-2:])}")
    x = to_rgb(x).float().mean(1, keepdim=True)  # alpha composited on white, as files are read
    x = F.adaptive_avg_pool2d(x, DIGITS_SIZE)
    x = x / 127.5 - 1.0
    return x[0] if single else x


def check_labels(labels, n: int | None = None, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Intended classes as a (N,) int64 tensor, checked: integers (ints, or floats with integer
    values) in ``0..num_classes-1``, and ``n`` of them when ``n`` is given; ValueError naming the
    first bad entry's index and value otherwise."""
    t = torch.as_tensor(labels).flatten()
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            k = int((~torch.isfinite(t) | (t != t.round())).nonzero()[0])
            raise ValueError(f"labels must be integers in 0..{num_classes - 1}, got {t[k].item()!r} at index {k}")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"labels must be integers in 0..{num_classes - 1}, got dtype {t.dtype}")
    t = t.long()
    outside = (t < 0) | (t >= num_classes)
    if bool(outside.any()):
        k = int(outside.nonzero()[0])
        raise ValueError(f"labels: the label at index {k} is {int(t[k])}, outside 0..{num_classes - 1} "
                         f"({int(outside.sum())} label(s) out of range)")
    if n is not None and len(t) != n:
        raise ValueError(f"labels has {len(t)} entries for {n} images")
    return t


def read_labels(path, n: int | None = None, num_classes: int = NUM_CLASSES) -> list[int]:
    """Labels from a text file, one integer per non-blank line (surrounding spaces ignored), each
    in ``0..num_classes-1``; ``n`` of them when given. Errors name the file and the line."""
    from pathlib import Path

    from .._io import read_text

    p = Path(path)
    text = read_text(p, "labels file")
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        try:
            lab = int(s)
        except ValueError:
            raise ValueError(f"{p}, line {lineno}: {s!r} is not an integer label (one label 0..{num_classes - 1} "
                             "per line)") from None
        if not 0 <= lab < num_classes:
            raise ValueError(f"{p}, line {lineno}: label {lab} is outside 0..{num_classes - 1}")
        out.append(lab)
    if n is not None and len(out) != n:
        raise ValueError(f"{p} has {len(out)} labels for {n} images (one per image, in sorted file order)")
    return out


def load_classifier() -> nn.Module:
    """The bundled digits classifier (``fewstep.models.classifier.load_digits_classifier()``).
    Raises ImportError with an explanation when it is not available."""
    try:
        from fewstep.models.classifier import load_digits_classifier
    except ImportError as err:
        raise ImportError(_MISSING) from err
    return load_digits_classifier()


class DigitsFeatures(nn.Module):
    """Feature extractor for the :mod:`fewstep.eval.features` pipeline around a digits
    classifier: ``embed(x)`` is ``classifier.features(x)`` on prepared (B, 1, 8, 8) input.

    ``classifier`` defaults to :func:`load_classifier`; any module with ``features(x)`` -> (B, D)
    and ``forward(x)`` -> logits (B, 10) works (tests use a small stand-in). ``name`` is
    recorded in statistics files so statistics of different classifiers are never compared.
    """

    def __init__(self, classifier: nn.Module | None = None, name: str = "fewstep-digits-classifier"):
        super().__init__()
        self.classifier = (classifier if classifier is not None else load_classifier()).eval()
        self.name = name
        with torch.no_grad():
            self.num_features = int(self.classifier.features(torch.zeros(1, 1, DIGITS_SIZE, DIGITS_SIZE)).shape[-1])

    def meta(self) -> dict:
        """Extractor and preprocessing identifiers recorded in statistics."""
        return {"extractor": self.name, "preprocess": "gray-area8-pm1", "dim": self.num_features}

    def prepare_fn(self):
        """Per-image preprocessing for data loaders: :func:`digits_prepare` (picklable)."""
        return digits_prepare

    @torch.no_grad()
    def embed(self, prepared: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, D) of prepared (B, 1, 8, 8) input."""
        dev = next(self.classifier.parameters()).device
        return self.classifier.features(prepared.to(dev, torch.float32)).float()

    @torch.no_grad()
    def logits(self, prepared: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10) of prepared input."""
        dev = next(self.classifier.parameters()).device
        return self.classifier(prepared.to(dev, torch.float32)).float()

    @torch.no_grad()
    def embed_and_logits(self, prepared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, D), logits (B, 10))`` of prepared input in one pass of the classifier's
        body when it offers ``classify(features)`` (the bundled one does), else two passes."""
        feats = self.embed(prepared)
        classify = getattr(self.classifier, "classify", None)
        if classify is None:
            return feats, self.logits(prepared)
        return feats, classify(feats.to(next(self.classifier.parameters()).device)).float()

    def embed_indexed(self, prepared: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, D), logits (B, 10))`` for :func:`fewstep.eval.features.extract_features`,
        which gathers the logits in source order (``index`` is not needed)."""
        return self.embed_and_logits(prepared)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of raw images (uint8 or [0, 1] float, any size >= 8)."""
        return self.embed(digits_prepare(images))


def digits_reference_images(size: int = 8, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out real digits as uint8 RGB images (N, 3, size, size) and their labels.

    ``load_digits_split(split)`` gives float [-1, 1] 8x8 images; they are quantised with
    ``round((x + 1) * 127.5)`` and upsampled by nearest neighbour (pixel replication) by the
    integer factor ``size / 8``, then replicated to 3 channels. This is the ``digits`` reference
    of ``fewstep eval fid``.
    """
    if not isinstance(size, int) or size < DIGITS_SIZE or size % DIGITS_SIZE:
        raise ValueError(f"size must be a positive multiple of 8, got {size!r}")
    try:
        from fewstep.models.digits import load_digits_split
    except ImportError as err:
        raise ImportError("fewstep.models.digits (the digits data set, issue 3) is not available") from err
    x, y = load_digits_split(split)
    u8 = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    k = size // DIGITS_SIZE
    u8 = u8.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    return u8.expand(-1, 3, -1, -1).contiguous(), y


@torch.no_grad()
def reference_stats(extractor: DigitsFeatures | None = None, reference: FeatureStats | torch.Tensor | None = None,
                    batch_size: int = 500) -> FeatureStats:
    """The reference statistics FD-digits compares against: ``reference`` as given when it already is
    :class:`FeatureStats`, else the ``extractor`` features (float64 mean and covariance) of the real
    images ``reference`` in [-1, 1] (M, 1, 8, 8), by default the held-out ``load_digits_split("test")``.
    Compute it once and pass it as ``reference=`` when scoring many sample sets."""
    if isinstance(reference, FeatureStats):
        return reference
    extractor = extractor if extractor is not None else DigitsFeatures()
    if reference is None:
        from fewstep.models.digits import load_digits_split

        reference = load_digits_split("test")[0]
    feats = torch.cat([extractor.embed(reference[i : i + batch_size]).cpu()
                       for i in range(0, len(reference), batch_size)])
    return FeatureStats.from_features(feats, extractor.meta())


def fd_digits(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    extractor: DigitsFeatures | None = None,
    reference: FeatureStats | torch.Tensor | None = None,
    batch_size: int = 500,
) -> dict:
    """FD-digits of generated digit images against the held-out real digits.

    Args:
        images: uint8 (N, C, H, W) or float in [0, 1], any size >= 8 (see module docstring),
            or a list of (C, H, W) images (sizes may differ).
        labels: intended classes (N,) int; when given, ``accuracy`` is the fraction the
            classifier assigns to them.
        extractor: a :class:`DigitsFeatures` (default: the bundled classifier).
        reference: reference statistics, or real images in [-1, 1] (M, 1, 8, 8); default
            ``load_digits_split("test")``.
    Returns:
        ``{"fd": float, "accuracy": float | None, "n": N, "n_ref": M}``.
    """
    extractor = extractor if extractor is not None else DigitsFeatures()
    if isinstance(images, (list, tuple)):
        prepared = []
        for i, im in enumerate(images):
            try:
                prepared.append(digits_prepare(im))
            except (ValueError, TypeError) as err:
                raise type(err)(f"image {i} of the list: {err}") from err
        x = torch.stack(prepared) if prepared else torch.zeros(0, 1, 8, 8)
    elif isinstance(images, torch.Tensor) and images.ndim == 4:
        x = digits_prepare(images)
    else:
        raise TypeError("images must be a (N, C, H, W) tensor or a list of (C, H, W) tensors")
    if labels is not None:
        labels = check_labels(labels, len(images))
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        if labels is None:
            feats.append(extractor.embed(x[i : i + batch_size]).cpu())
        else:
            f, lg = extractor.embed_and_logits(x[i : i + batch_size])
            feats.append(f.cpu())
            logits.append(lg.cpu())
    gen = FeatureStats.from_features(torch.cat(feats), extractor.meta())
    return fd_digits_from_stats(gen, torch.cat(logits) if logits else None, labels, extractor, reference, batch_size)


def fd_digits_from_stats(
    gen: FeatureStats,
    logits: torch.Tensor | None = None,
    labels=None,
    extractor: DigitsFeatures | None = None,
    reference: FeatureStats | torch.Tensor | None = None,
    batch_size: int = 500,
) -> dict:
    """FD-digits from the generated images' feature statistics: the second half of :func:`fd_digits`,
    shared with the sharded ``fewstep eval fd-digits``.

    Args:
        gen: float64 statistics of the generated images' ``extractor`` features.
        logits: (N, 10) classifier logits of the same images in the order of ``labels``; needed
            only for the accuracy.
        labels: intended classes (N,) int, or None (then ``accuracy`` is None).
        extractor, reference, batch_size: as in :func:`fd_digits` (the reference is embedded here).
    Returns:
        ``{"fd": float, "accuracy": float | None, "n": N, "n_ref": M}``.
    """
    extractor = extractor if extractor is not None else DigitsFeatures()
    reference = reference_stats(extractor, reference, batch_size)
    check_sample_size(gen.n, gen.dim, "generated images")
    check_sample_size(reference.n, reference.dim, "reference images")
    out = {"fd": gen.frechet_distance(reference), "accuracy": None, "n": gen.n, "n_ref": reference.n}
    if labels is not None:
        labels = check_labels(labels, num_classes=NUM_CLASSES if logits is None else int(logits.shape[-1]))
        if logits is None or len(logits) != len(labels) or len(labels) != gen.n:
            n_logits = None if logits is None else len(logits)
            raise ValueError(f"labels has {len(labels)} entries for {gen.n} images ({n_logits} logits)")
        out["accuracy"] = float((logits.argmax(1) == labels).float().mean())
    return out
