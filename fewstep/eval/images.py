"""Image sources for evaluation: a folder, a zip file, or an in-memory uint8 tensor.

Every source yields uint8 RGB tensors (3, H, W) by index. Files are decoded with PIL and read
as a person sees them (:func:`pil_to_rgb_tensor`): 16-bit images scaled to 8 bits, grey
replicated to 3 channels, palettes expanded, transparency composited on white; modes without a
known white level (32-bit float or integer) are refused by name. Sizes may differ from image to
image: preprocessing resizes each one on its own before batching.

All non-hidden regular files of a folder or zip are candidates (sorted by relative path, so the
order is deterministic); a file PIL cannot open is *bad*. :func:`find_bad_images` lists them;
callers stop with that list unless told to skip them (``--skip-bad``).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "ImageSource",
    "FileImageSource",
    "TensorImageSource",
    "open_image_source",
    "find_bad_images",
    "BadImagesError",
    "pil_to_rgb_tensor",
    "unsupported_mode",
]


class BadImagesError(ValueError):
    """Raised when a source contains files that cannot be read as images; ``.bad`` lists
    ``(name, reason)`` pairs."""

    def __init__(self, source: str, bad: list[tuple[str, str]], note: str = ""):
        self.bad = bad
        shown = "\n".join(f"  {n}: {r}" for n, r in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        super().__init__(
            f"{len(bad)} unreadable or non-image file(s) in {source}:\n{shown}{more}\n"
            "fix or remove them, or pass --skip-bad (skip_bad=True) to ignore them" + (f"; {note}" if note else "")
        )


class ImageSource:
    """Indexable collection of images: ``len(src)``, ``src.names[i]``, ``src.load(i)`` returns a
    uint8 (3, H, W) tensor. ``description`` says where the images come from."""

    names: list[str]
    description: str

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> torch.Tensor:  # pragma: no cover - interface
        """Decode image ``i`` to a uint8 (3, H, W) RGB tensor."""
        raise NotImplementedError

    def subset(self, keep: list[int]) -> "ImageSource":
        """A view of this source restricted to the indices ``keep`` (in that order)."""
        return _Subset(self, keep)


class _Subset(ImageSource):
    def __init__(self, base: ImageSource, keep: list[int]):
        self.base, self.keep = base, list(keep)
        self.names = [base.names[i] for i in self.keep]
        self.description = base.description

    def load(self, i: int) -> torch.Tensor:
        return self.base.load(self.keep[i])

    def check(self, i: int) -> str | None:
        """The base source's check of image ``i`` of the view (None where the base cannot be bad)."""
        check = getattr(self.base, "check", None)
        return None if check is None else check(self.keep[i])


_GREY16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PREMULTIPLIED = frozenset({"La", "RGBa"})
# modes PIL converts exactly as a viewer shows them (no colour management: ICC profiles are ignored)
_CONVERT = {"1": "L", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "RGBX": "RGB"}
_DIRECT = frozenset({"L", "LA", "RGB", "RGBA", "P"})


def _bits_per_sample(img: Image.Image) -> int | None:
    tags = getattr(img, "tag_v2", None)
    bps = tags.get(258) if tags is not None else None  # TIFF BitsPerSample
    if isinstance(bps, (tuple, list)):
        bps = bps[0] if bps else None
    return int(bps) if bps is not None else None


def unsupported_mode(img: Image.Image) -> str | None:
    """Why ``img`` (an opened PIL image) cannot be read as a person would see it, or None.

    Refused: 32-bit float images (mode ``F``) and 32-bit integer images (mode ``I`` other than
    PIL's reading of 16-bit PNG/PGM/TIFF), whose white level is unknown, and modes PIL adds later.
    Cheap: looks at the header only (used by the bad-file check before any decoding)."""
    mode, fmt = img.mode, img.format or "in-memory"
    if mode in _DIRECT or mode in _GREY16 or mode in _PREMULTIPLIED or mode in _CONVERT:
        return None
    if mode == "I":
        if fmt in ("PNG", "PPM") or (fmt == "TIFF" and _bits_per_sample(img) == 16):
            return None
        bits = _bits_per_sample(img)
        what = f"{fmt}, {bits} bits per sample" if bits else fmt
        return (f"unsupported image mode I (32-bit integer, {what}): its white level is unknown; "
                "save it as an 8- or 16-bit image")
    if mode == "F":
        return (f"unsupported image mode F (32-bit float, {fmt}): its range is unknown; "
                "save it as an 8- or 16-bit image")
    return f"unsupported image mode {mode} ({fmt}); save it as an 8- or 16-bit grey, RGB or RGBA image"


def _transparent_where(values: np.ndarray, key) -> np.ndarray | None:
    """Alpha (255 opaque, 0 transparent) of a PNG colour key ``key`` (tRNS of L / I;16 / RGB)."""
    if key is None or isinstance(key, (bytes, bytearray)):
        return None
    key = np.asarray(key)
    hit = (values == key).all(-1) if values.ndim == 3 else values == key
    return np.where(hit, 0, 255).astype(np.uint8)


def pil_to_rgb_tensor(img: Image.Image) -> torch.Tensor:
    """A decoded PIL image as a uint8 (3, H, W) RGB tensor, read as a person sees it.

    * 8-bit ``L``/``RGB``: as stored; grey is replicated to 3 channels; ``1`` (bilevel) is 0/255.
    * 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, and ``I`` from 16-bit PNG/PGM/TIFF): scaled to
      8 bits by ``round(v / 257)`` (65535 -> 255; the 8-bit value k stored as 257 k reads as k).
      16-bit RGB(A) PNGs arrive from PIL already reduced to 8 bits (its high byte, ``v >> 8``).
    * Palette (``P``, ``PA``): expanded through the palette.
    * Transparency (``RGBA``, ``LA``, ``PA``, palette or PNG colour-key transparency, premultiplied
      ``RGBa``/``La``): composited on white (:func:`fewstep.eval.preprocess.composite_on_white`);
      an opaque alpha changes nothing.
    * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion to RGB (no colour management).
    * Anything else (``F``, 32-bit ``I``): ValueError naming the mode (:func:`unsupported_mode`).
    """
    from .preprocess import composite_on_white, to_rgb

    reason = unsupported_mode(img)
    if reason is not None:
        raise ValueError(reason)
    mode = img.mode
    key = img.info.get("transparency")
    if mode in _GREY16 or mode == "I":
        raw = np.asarray(img).astype(np.int64)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise ValueError(f"16-bit image (mode {mode}) with values outside 0..65535 "
                             f"({raw.min()}..{raw.max()})")
        arr = ((raw + 128) // 257).astype(np.uint8)[..., None]
        alpha = _transparent_where(raw, key)
        if alpha is not None:
            arr = np.concatenate([arr, alpha[..., None]], -1)
    elif mode in _PREMULTIPLIED:  # premultiplied alpha on white: c_premultiplied + (255 - a)
        raw = np.asarray(img).astype(np.int32)
        color, a = raw[..., :-1], raw[..., -1:]
        arr = np.clip(color + 255 - a, 0, 255).astype(np.uint8)
    else:
        if mode == "P" or (mode in ("1", "L", "RGB") and key is not None):
            has_alpha = key is not None or (mode == "P" and img.palette is not None and "A" in img.palette.mode)
            img = img.convert("RGBA" if has_alpha else "RGB")
        elif mode in _CONVERT:
            img = img.convert(_CONVERT[mode])
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[..., None]
    t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)[None]
    if t.shape[1] in (2, 4):
        t = composite_on_white(t[:, :-1], t[:, -1:])
    return to_rgb(t)[0].contiguous()


SAMPLE_RECORD = "record.json"


def read_sample_record(folder: str | os.PathLike) -> dict | None:
    """The ``record.json`` that ``fewstep sample`` writes into its output folder (settings, image
    file names, per-image labels), or None when ``folder`` holds none (or another program's)."""
    import json

    p = Path(folder) / SAMPLE_RECORD
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("command") != "fewstep sample" or not isinstance(rec.get("images"), list):
        return None
    return rec


class FileImageSource(ImageSource):
    """Images in a folder (searched recursively) or a ``.zip`` archive.

    Every file counts (a non-image is reported as bad, never silently dropped), except in an output
    folder of ``fewstep sample``: there exactly the images its ``record.json`` lists are used (not
    ``grid.png`` or the record itself), and :attr:`record` holds that record.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip = None
        self.record = None
        if self.path.is_dir() and (rec := read_sample_record(self.path)) is not None:
            self.kind = "folder"
            self.record = rec
            missing = [n for n in rec["images"] if not (self.path / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{self.path / SAMPLE_RECORD} lists {len(missing)} image(s) that are missing, "
                                        f"e.g. {missing[0]!r}")
            self.names = sorted(str(n) for n in rec["images"])
        elif self.path.is_dir():
            self.kind = "folder"
            files = [
                p
                for p in self.path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.path).parts)
            ]
            self.names = sorted(str(p.relative_to(self.path)) for p in files)
        elif self.path.is_file() and zipfile.is_zipfile(self.path):
            self.kind = "zip"
            with zipfile.ZipFile(self.path) as zf:
                self.names = sorted(
                    i.filename
                    for i in zf.infolist()
                    if not i.is_dir()
                    and not any(part.startswith(".") or part == "__MACOSX" for part in i.filename.split("/"))
                )
        elif not self.path.exists():
            raise FileNotFoundError(f"image source {str(self.path)!r} does not exist (give a folder of images or a "
                                    "zip)")
        elif self.path.suffix.lower() == ".zip":
            raise ValueError(f"image source {str(self.path)!r} is not a readable zip archive (truncated or corrupt?); "
                             "recreate it, or unpack it and pass the folder")
        else:
            raise ValueError(f"image source {str(self.path)!r} is a file but neither a folder nor a zip archive")
        self.description = f"{self.kind} {self.path}" + (
            f" (the {len(self.names)} images of its fewstep sample record)" if self.record is not None else "")

    def __getstate__(self):  # zip handles do not pickle (DataLoader workers reopen them)
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    def _open(self, i: int) -> Image.Image:
        name = self.names[i]
        if self.kind == "folder":
            return Image.open(self.path / name)
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return Image.open(io.BytesIO(self._zip.read(name)))

    def load(self, i: int) -> torch.Tensor:
        with self._open(i) as img:
            img.load()
            return pil_to_rgb_tensor(img)

    def check(self, i: int) -> str | None:
        """None if file ``i`` opens and verifies as an image in a mode that can be read, else the
        reason."""
        try:
            with self._open(i) as img:
                reason = unsupported_mode(img)
                if reason is not None:
                    return reason
                img.verify()
        except Exception as err:  # PIL raises many types for bad files
            return f"{type(err).__name__}: {err}"
        return None


class TensorImageSource(ImageSource):
    """Images held in memory as uint8 (N, C, H, W), C in {1, 2, 3, 4}, converted to RGB as files
    are (grey replicated, alpha composited on white: :func:`fewstep.eval.preprocess.to_rgb`)."""

    def __init__(self, images: torch.Tensor, description: str = "tensor", names: list[str] | None = None):
        from .preprocess import to_rgb

        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError("images must be a uint8 torch.Tensor (N, C, H, W)")
        self.images = to_rgb(images).contiguous()
        self.names = names or [f"{description}[{i}]" for i in range(len(images))]
        self.description = description

    def load(self, i: int) -> torch.Tensor:
        return self.images[i]


def open_image_source(path: str | os.PathLike) -> FileImageSource:
    """A :class:`FileImageSource` for a folder or a zip; FileNotFoundError otherwise."""
    return FileImageSource(path)


def find_bad_images(source: ImageSource, progress: bool = False) -> list[tuple[str, str]]:
    """``(name, reason)`` for every file of ``source`` that PIL cannot open and verify.

    In-memory sources have no bad images; a :meth:`ImageSource.subset` view of a file source is
    checked like its base (the sharded check of the feature pipeline relies on that). Uses
    ``Image.verify`` (header and, for PNG, checksums), which is much cheaper than decoding;
    decode failures found later are reported by the feature pipeline the same way.
    """
    if not isinstance(source, FileImageSource) and not isinstance(getattr(source, "base", None), FileImageSource):
        return []
    from tqdm.auto import tqdm

    bad = []
    for i in tqdm(range(len(source)), desc="checking files", unit="img", disable=not progress, leave=False):
        reason = source.check(i)
        if reason is not None:
            bad.append((source.names[i], reason))
    return bad
