"""Image preprocessing for the FID Inception network: quantisation and resize to 299 px.

Two modes, then ``(x - 128) / 128``:

``"tf"`` (default)
    TensorFlow 1 ``tf.image.resize_bilinear(align_corners=False)`` in float32: ``src = dst * in/out``,
    no half-pixel centres, no antialiasing (TTUR FID, NVlabs, torch-fidelity, torchmetrics with
    ``antialias=False``).
``"clean"``
    clean-fid's ``mode="clean"``: PIL bicubic per channel as a float (``"F"``) image, clipped to
    [0, 255], not re-quantised.

Inputs are uint8 in [0, 255]; float images in [0, 1] are quantised by rounding ``round(x * 255)``,
not truncated. Which tools each mode matches and how much the choices move FID:
docs/evaluation.md, "Preprocessing".
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = [
    "PREPROCESS_MODES", "to_uint8", "to_rgb", "composite_on_white", "resize_tf_bilinear", "resize_pil_bicubic",
    "inception_preprocess",
]

PREPROCESS_MODES = ("tf", "clean")
INCEPTION_SIZE = 299


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known preprocessing mode, else raise ValueError."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")
    return mode


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Return uint8 images: uint8 passes through; float in [0, 1] becomes ``round(x*255)``.

    Raises ValueError for non-finite floats (NaN, inf: NaN passes every range comparison and would
    become black pixels) and for floats outside [0, 1] (a [0, 255] or [-1, 1] float tensor is a
    common mistake that would silently give a wrong metric), naming the first offending image of
    a (B, C, H, W) batch; TypeError for other dtypes.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}")
    if not images.numel():
        return images.to(torch.uint8)

    def which(bad: torch.Tensor) -> str:
        if images.ndim != 4:
            return "the image has"
        per_image = bad.reshape(len(images), -1).any(1)
        idx = per_image.nonzero().flatten().tolist()
        more = f" (and {len(idx) - 1} more)" if len(idx) > 1 else ""
        return f"image {idx[0]} of the batch{more} has"

    finite = torch.isfinite(images)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(images).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(f"{which(~finite)} non-finite values ({n_nan} NaN, {n_inf} inf): images must be finite "
                         "floats in [0, 1] or uint8; check the sampler output (fewer steps, lower guidance)")
    outside = (images < 0) | (images > 1)
    if bool(outside.any()):
        raise ValueError(
            f"float images must lie in [0, 1]: {which(outside)} values in [{images.min().item():.3g}, "
            f"{images.max().item():.3g}]; map [-1, 1] with (x + 1) / 2 or pass uint8 for [0, 255]"
        )
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def composite_on_white(color: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Straight (non-premultiplied) alpha composited on white, in exact integer arithmetic:
    ``round((c a + 255 (255 - a)) / 255)`` for uint8 ``color`` (B, C, H, W) and ``alpha``
    (B, 1, H, W). An opaque alpha (255) returns ``color`` unchanged."""
    c, a = color.to(torch.int32), alpha.to(torch.int32)
    return torch.div(c * a + 255 * (255 - a) + 127, 255, rounding_mode="floor").to(torch.uint8)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) to 3 channels. C = 1 (grey) is replicated; C = 3 passes; C = 2 (grey + alpha)
    and C = 4 (RGBA) are composited on white (:func:`composite_on_white`; uint8 only), as image
    files with transparency are read (docs/evaluation.md, "Reading files")."""
    if images.ndim != 4 or images.shape[1] not in (1, 2, 3, 4):
        raise ValueError(f"images must have shape (B, C, H, W) with C in (1, 2, 3, 4), got {tuple(images.shape)}")
    c = images.shape[1]
    if c in (2, 4):
        if images.dtype != torch.uint8:
            raise TypeError(f"images with an alpha channel (C={c}) must be uint8, got {images.dtype}")
        images = composite_on_white(images[:, : c - 1], images[:, c - 1 :])
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images


def resize_tf_bilinear(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False) of (B, C, H, W).

    Source coordinate of output pixel ``i`` is ``i * in / out``; the two neighbours are
    ``floor`` and ``min(floor + 1, in - 1)``; interpolation first along x (top and bottom rows),
    then along y, in float32 (TensorFlow's order). Returns float32.
    """
    x = x.to(torch.float32)
    b, c, h, w = x.shape

    def axis(n_in: int):
        scale = n_in / size
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale
        lo = src.floor()
        frac = src - lo
        lo = lo.long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, frac

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    # x first: interpolating every source row along x gives TF's "top"/"bottom" rows exactly
    left, right = x[..., x0], x[..., x1]
    rows = left + (right - left) * fx
    top, bot = rows[:, :, y0], rows[:, :, y1]
    return top + (bot - top) * fy[:, None]


def resize_pil_bicubic(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid "clean" resize: each channel as a PIL float image (mode "F"), bicubic to
    ``size``, clipped to [0, 255]; no re-quantisation. (B, C, H, W) -> float32 on x's device."""
    arr = x.detach().to("cpu", torch.float32).numpy()
    out = np.empty(arr.shape[:2] + (size, size), dtype=np.float32)
    for i in range(arr.shape[0]):
        for ch in range(arr.shape[1]):
            img = Image.fromarray(arr[i, ch])
            out[i, ch] = np.asarray(img.resize((size, size), resample=Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(out.clip(0, 255)).to(x.device)


def inception_preprocess(images: torch.Tensor, mode: str = "tf") -> torch.Tensor:
    """Images (B, C, H, W), uint8 or float in [0, 1] (rounded), C in {1, 2, 3, 4}, to the FID
    Inception input: float32 (B, 3, 299, 299) in ``(x - 128) / 128`` units, resized per ``mode``
    (see the module docstring for which tool each mode matches)."""
    check_mode(mode)
    x = to_rgb(to_uint8(images))
    if x.shape[-2:] == (INCEPTION_SIZE, INCEPTION_SIZE):
        x = x.to(torch.float32)
    elif mode == "tf":
        x = resize_tf_bilinear(x)
    else:
        x = resize_pil_bicubic(x)
    return (x - 128.0) / 128.0
