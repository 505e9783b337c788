"""The shipped digits classifier: class accuracy of generated digits and FD-digits features.

A small CNN trained on the ``"train"`` split of :func:`fewstep.models.digits.load_digits_split`
(see :func:`fewstep.models.train.train_classifier`). Its penultimate layer (after ReLU) gives the
features of the Frechet distance FD-digits, the digits analogue of FID (Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"), computed in
:mod:`fewstep.eval.fd_digits`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .._io import read_json

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "digits_classifier.safetensors"
CLASSIFIER_CONFIG = WEIGHTS_DIR / "digits_classifier.json"


class DigitsClassifier(nn.Module):
    """CNN for 8x8 digits: two conv stages (8x8 -> 4x4 -> 2x2), a ``feature_dim`` penultimate layer.

    Input ``x``: float tensor ``(B, 1, 8, 8)`` in [-1, 1] (the convention of
    :func:`fewstep.models.digits.load_digits_split`). :meth:`features` returns the penultimate
    activations ``(B, feature_dim)`` (non-negative, after ReLU); :meth:`forward` returns logits
    ``(B, 10)``.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        if width < 1 or feature_dim < 1:
            raise ValueError(f"width and feature_dim must be >= 1, got width={width}, feature_dim={feature_dim}")
        self.width, self.feature_dim = int(width), int(feature_dim)
        w = self.width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 4, self.feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, 10)

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, 1, 8, 8) in [-1, 1], got {shape}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` of images ``x`` ``(B, 1, 8, 8)`` in [-1, 1]."""
        self._check(x)
        return self.body(x.float())

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)`` from :meth:`features` output (the head; dropout is off in eval)."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)`` of images ``x`` ``(B, 1, 8, 8)`` in [-1, 1]."""
        return self.classify(self.features(x))


def load_digits_classifier(device: str | torch.device = "cpu") -> DigitsClassifier:
    """Load the shipped digits classifier (eval mode, gradients off) from package data, offline.

    Weights: ``fewstep/models/weights/digits_classifier.safetensors``; architecture, training
    config, seed and held-out accuracy: ``digits_classifier.json`` next to it. Retrain with
    ``fewstep train-classifier``.
    """
    from safetensors.torch import load_file

    if not CLASSIFIER_WEIGHTS.exists() or not CLASSIFIER_CONFIG.exists():
        raise FileNotFoundError(
            f"digits classifier weights not found at {CLASSIFIER_WEIGHTS}; reinstall fewstep or run "
            "`fewstep train-classifier`"
        )
    meta = read_json(CLASSIFIER_CONFIG, "digits classifier config")
    model = DigitsClassifier(**meta["architecture"])
    model.load_state_dict(load_file(str(CLASSIFIER_WEIGHTS)))
    return model.to(device).eval().requires_grad_(False)
