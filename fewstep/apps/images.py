"""Images for ``fewstep sample`` and the demo: tensors/arrays to PIL, nearest upscaling, grids."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image


def to_pil_list(images) -> list:
    """PIL images from a list of PIL images, a ``(B, C, H, W)`` tensor or a ``(B, H, W, C)`` array in [0, 1]."""
    if isinstance(images, list) and (not images or isinstance(images[0], Image.Image)):
        return images
    if hasattr(images, "detach"):  # a torch tensor
        arr = images.detach().cpu().float().permute(0, 2, 3, 1).numpy()
    else:
        arr = np.asarray(images)
    arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], "L") for a in arr]
    return [Image.fromarray(a) for a in arr]


def upscale(img: Image.Image, factor: int) -> Image.Image:
    """Nearest-neighbour upscaling by an integer ``factor`` (1: unchanged)."""
    if factor <= 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def auto_upscale(img: Image.Image, target: int = 64) -> int:
    """Nearest-neighbour factor that brings small images (digits are 8x8) to about ``target`` px."""
    return max(1, target // max(1, min(img.size)))


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2, background=0) -> Image.Image:
    """Tile equal-size PIL images into one image (``ncols`` default ``ceil(sqrt(n))``)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    w, h = images[0].size
    mode = "RGB" if any(im.mode != "L" for im in images) else "L"
    bg = background if mode == "L" else (background,) * 3
    grid = Image.new(mode, (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), bg)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im.convert(mode), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
