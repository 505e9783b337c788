"""The scikit-learn handwritten digits as a tiny image data set, with a fixed held-out split.

``sklearn.datasets.load_digits`` ships 1797 greyscale 8x8 images (pixel values 0..16, ten classes)
inside scikit-learn, so nothing is downloaded. fewstep splits them once, the same way everywhere:
a stratified 80/20 split with ``sklearn.model_selection.train_test_split(random_state=0)``, giving
1437 training and 360 test images. The teacher and the classifier are trained on ``"train"`` only;
``"test"`` is the held-out reference for FD-digits and classifier accuracy.
"""

from __future__ import annotations

import numpy as np
import torch

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
NUM_CLASSES = 10
IMAGE_SIZE = 8


def _split_indices() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32)
    labels = data.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels, shuffle=True
    )
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def split_indices(split: str) -> np.ndarray:
    """Indices into ``sklearn.datasets.load_digits()`` of ``split`` ("train" or "test"), sorted."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _, _, train_idx, test_idx = _split_indices()
    return train_idx if split == "train" else test_idx


def to_model_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map sklearn digit pixel values 0..16 to the model range [-1, 1] (``x / 8 - 1``)."""
    return torch.as_tensor(pixels, dtype=torch.float32) / 8.0 - 1.0


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of the fixed digits split ``split`` ("train" or "test").

    ``images`` is a float32 tensor of shape ``(N, 1, 8, 8)`` scaled to [-1, 1] (sklearn's 0..16
    mapped by ``x / 8 - 1``); ``labels`` is an int64 tensor of shape ``(N,)`` with values 0..9.
    The split is stratified by class, 20% test, seeded (``random_state=0``), hence identical on
    every call and machine: 1437 train and 360 test images, disjoint.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels, train_idx, test_idx = _split_indices()
    idx = train_idx if split == "train" else test_idx
    x = to_model_range(images[idx]).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels[idx].copy())
    return x, y
