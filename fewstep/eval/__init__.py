"""Evaluation: offline FID Inception / CLIP / digits feature extractors, FID, KID, CLIP score
and FD-digits. Guide: docs/evaluation.md; command line: ``fewstep eval --help``.

Submodules: :mod:`~fewstep.eval.frechet` (the one Frechet distance, feature statistics),
:mod:`~fewstep.eval.preprocess` (``tf`` / ``clean`` resize modes), :mod:`~fewstep.eval.inception`,
:mod:`~fewstep.eval.metrics` (FID, KID), :mod:`~fewstep.eval.images`, :mod:`~fewstep.eval.features`,
:mod:`~fewstep.eval.clip_score`, :mod:`~fewstep.eval.fd_digits`. Heavy imports (transformers,
torchmetrics) happen only when the corresponding names are used.
"""

from __future__ import annotations

import importlib
import sys
import types

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

# ``fd_digits`` and ``clip_score`` are both a submodule and the function it exports. Importing the
# submodule (``from fewstep.eval.fd_digits import ...``, as the CLI does) makes the import system bind
# it as a package attribute, after which ``from fewstep.eval import fd_digits`` returned the module.
# The package therefore never binds those submodules as attributes; they stay importable by path.
_FUNCTION_NAMED_SUBMODULES = frozenset({"fd_digits", "clip_score"})


class _EvalPackage(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _FUNCTION_NAMED_SUBMODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _EvalPackage


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fewstep.eval' has no attribute {name!r}")
