"""Robust image reading: every file becomes an 8-bit RGB ``PIL.Image`` or a :class:`BadImageError`.

Conversions done by :func:`load_rgb` (in this order):

- the whole file is decoded (``Image.load()``), so truncated or corrupt data fails here, not later;
- the EXIF orientation tag is applied (``ImageOps.exif_transpose``); a broken EXIF block is ignored;
- multi-frame files (GIF, TIFF) give their first frame;
- 16-bit (and 32-bit integer / float) single-channel images are *scaled* to 8 bit: ``round(v / 257)``
  for 16-bit data (``I;16*`` modes, or mode ``I`` with values <= 65535), ``v * 255`` for float data in
  [0, 1]; nothing is clipped silently. 16-bit RGB PNGs are reduced to 8 bit by Pillow's decoder itself;
- grayscale (``1``, ``L``) is replicated to three channels; palette images are expanded;
- images with an alpha channel (``RGBA``, ``LA``, ``PA``, palette with transparency) are composited on
  **black**: ``rgb * alpha / 255`` (premultiplied), so fully transparent pixels become 0;
- CMYK (including Adobe's inverted CMYK JPEGs, which Pillow's decoder un-inverts) and YCbCr go through
  Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                                     ".pgm", ".pbm", ".jfif")


class BadImageError(ValueError):
    """An unreadable or unusable image file. ``path`` and ``reason`` are kept as attributes."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason}")


def _to_uint8_gray(img: Image.Image) -> Image.Image:
    """Scale a high-bit-depth single-channel image (modes I;16*, I, F) to mode ``L``."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale)
        out = np.clip(np.rint(arr), 0, 255)
    else:
        arr = arr.astype(np.int64)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise ValueError(f"mode {img.mode} values in [{arr.min()}, {arr.max()}] are not 16-bit data")
        out = (arr * 255 + 32767) // 65535  # = round(v / 257) for 16-bit data, exact for 0 and 65535
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _composite_on_black(img: Image.Image) -> Image.Image:
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB with the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _to_uint8_gray(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite_on_black(img)
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "RGBX", "HSV"):
        return img.convert("RGB")
    raise ValueError(f"unsupported image mode {mode!r}")


def load_rgb(path: str | os.PathLike, min_size: int = 1) -> Image.Image:
    """Read ``path`` fully and return an 8-bit RGB image (EXIF orientation applied).

    Args:
        path: image file.
        min_size: the smallest allowed height and width in pixels (e.g. one patch), after EXIF rotation.

    Raises:
        BadImageError: a missing or 0-byte file, a file that is not an image, truncated or corrupt data,
            an unsupported mode, or an image smaller than ``min_size`` pixels on a side.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as err:
        raise BadImageError(p, f"cannot read file ({err.strerror or err}); check the path") from err
    if size == 0:
        raise BadImageError(p, "0-byte file (empty); re-download or delete it")
    try:
        with Image.open(p) as im:
            im.load()  # force the full decode: truncated data raises here
            try:
                im2 = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the pixels
                im2 = im
            try:
                rgb = to_rgb(im2)
            except ValueError as err:
                raise BadImageError(p, f"cannot convert to 8-bit RGB: {err}") from err
            if rgb is im:
                rgb = im.copy()
    except BadImageError:
        raise
    except UnidentifiedImageError as err:
        raise BadImageError(p, "not an image (Pillow cannot identify the format)") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(p, f"decompression bomb guard: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImageError(p, f"truncated or corrupt image data ({err})") from err
    w, h = rgb.size
    if w < min_size or h < min_size:
        raise BadImageError(p, f"image is {w}x{h} pixels, smaller than the minimum {min_size} px per side "
                               f"(e.g. one patch); upscale it or remove it")
    return rgb


def check_image(path: str | os.PathLike, min_size: int = 1) -> str | None:
    """``None`` if :func:`load_rgb` succeeds on ``path``, else the reason it fails."""
    try:
        load_rgb(path, min_size)
    except BadImageError as err:
        return err.reason
    return None


def list_images(root: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``root`` (recursive, following symlinks but not cycles), sorted by relative POSIX path.

    Extensions are matched case-insensitively; hidden files and folders (starting with ``.``) are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle: do not descend again
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                out.append(Path(dirpath) / f)
    return sorted(out, key=lambda q: q.relative_to(root).as_posix())
