"""Evaluation: offline FID Inception / CLIP / digits feature extractors, FID, KID, CLIP score
and FD-digits. See the README section "Evaluation" and ``fewstep eval --help``.

Submodules: :mod:`~fewstep.eval.frechet` (the one Frechet distance, feature statistics),
:mod:`~fewstep.eval.preprocess` (``tf`` / ``clean`` resize modes), :mod:`~fewstep.eval.inception`,
:mod:`~fewstep.eval.metrics` (FID, KID), :mod:`~fewstep.eval.images`, :mod:`~fewstep.eval.features`,
:mod:`~fewstep.eval.clip_score`, :mod:`~fewstep.eval.fd_digits`. Heavy imports (transformers,
torchmetrics) happen only when the corresponding names are used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "frechet_distance": "frechet",
    "FeatureStats": "frechet",
    "inception_preprocess": "preprocess",
    "PREPROCESS_MODES": "preprocess",
    "InceptionFeatures": "inception",
    "find_inception_weights": "inception",
    "FID": "metrics",
    "KID": "metrics",
    "fid_from_stats": "frechet",
    "kernel_inception_distance": "metrics",
    "open_image_source": "images",
    "TensorImageSource": "images",
    "BadImagesError": "images",
    "extract_features": "features",
    "CLIPScorer": "clip_score",
    "CLIPPairScores": "clip_score",
    "clip_score": "clip_score",
    "clip_score_from_pair_scores": "clip_score",
    "fd_digits": "fd_digits",
    "fd_digits_from_stats": "fd_digits",
    "DigitsFeatures": "fd_digits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fewstep.eval' has no attribute {name!r}")
