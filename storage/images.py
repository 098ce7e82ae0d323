"""Reading users' photos: every mode PIL knows turned into 8-bit sRGB, EXIF rotation applied.

Used by the ``folder`` source and by ``colorize image`` so both accept exactly the same inputs and
reject bad ones with the same one-line reasons.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".jfif"}


class ImageError(ValueError):
    """A file that cannot be used as a photo; the message says why in one line."""


@dataclass
class Photo:
    rgb: np.ndarray  # H x W x 3 uint8
    alpha: np.ndarray | None  # H x W uint8, when the file had transparency
    grayscale: bool  # the file held no colour (L, I;16, ... or R == G == B everywhere)


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float modes: rescale by the type's range, not truncate."""
    arr = np.asarray(im)
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = (0.0, 1.0) if arr.max(initial=0) <= 1.0 else (0.0, 255.0)
    else:
        lo, hi = 0.0, 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
    scaled = np.clip((arr.astype(np.float64) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


@contextlib.contextmanager
def _bomb_limit(max_pixels: int) -> Iterator[None]:
    """Raise Pillow's own decompression-bomb limit to ours while opening, so a ``--max-pixels`` above its
    default (89.5 MP) is honoured instead of silently capped; a lower one is left to our own check."""
    default = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(default or 0, max_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = default


def load_photo(path: Path | str, max_pixels: int = 80_000_000) -> Photo:
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with warnings.catch_warnings(), _bomb_limit(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"{path}: {w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,}")
                im.load()
                im = ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: unreadable or truncated image ({exc})") from None
    alpha = None
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(im.getchannel("A"))
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit_gray(im)
    rgb = np.asarray(im.convert("RGB"))
    gray = im.mode in ("1", "L", "LA", "La") or bool(
        np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    )
    return Photo(rgb=np.ascontiguousarray(rgb), alpha=alpha, grayscale=gray)


def _is_work_dir(folder: Path) -> bool:
    """A colorize work dir (or a stage folder inside one): its PNGs are our outputs, not photos."""
    return (folder / "mlflow.db").exists() or (folder / ".prefect").is_dir() or (folder / "manifest.json").is_file()


def find_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted for a stable order). Hidden files and folders are
    skipped, and so are ``exclude`` (the run's own work dir) and anything that looks like a work dir or a
    stage folder: a work dir inside the photo folder must never feed the pipeline its own outputs."""
    folder = Path(folder)
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for top, dirs, names in os.walk(folder):
        here = Path(top)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (here / d).resolve() != skip and not _is_work_dir(here / d)
        )
        found += [here / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())
