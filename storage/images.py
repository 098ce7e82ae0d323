"""Reading users' photos: every mode PIL knows turned into 8-bit sRGB, EXIF rotation applied.

Used by the ``folder`` source and by ``colorize image`` so both accept exactly the same inputs and
reject bad ones with the same one-line reasons.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".jfif"}

MAX_PIXELS = 80_000_000  # larger images are refused: decompression bombs, memory (every loader's default)


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


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_data_shortfall(path: Path) -> tuple[int, int] | None:
    """(bytes of pixel data found, bytes the header promises) when a PNG's compressed data ends before
    its image does, else None. Pillow decodes such a file without a word (a PNG that declares 8000x8000
    and carries one row gives 64 MP of black), so the pixel data is counted here, streaming, against
    what the header's size, bit depth, colour type and interlacing need."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        inflate, got, expected = zlib.decompressobj(), 0, None
        while len(head := fh.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            body = fh.read(length)
            fh.read(4)  # crc: Pillow checks it
            if kind == b"IHDR" and len(body) >= 13:
                w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
                bits = depth * _PNG_CHANNELS.get(colour, 4)
                passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
                sizes = [(-(-(w - x) // dx), -(-(h - y) // dy)) for x, y, dx, dy in passes]
                expected = sum(ph * (1 + -(-pw * bits // 8)) for pw, ph in sizes if pw > 0 and ph > 0)
            elif kind == b"IDAT":
                try:
                    while body and got <= (expected or 0):
                        got += len(inflate.decompress(body, 1 << 20))
                        body = inflate.unconsumed_tail
                except zlib.error:
                    return got, expected or 0
            elif kind == b"IEND":
                break
    return (got, expected) if expected is not None and got < expected else None


def load_photo(path: Path | str, max_pixels: int = MAX_PIXELS) -> Photo:
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
                if im.format == "PNG" and (short := png_data_shortfall(path)):
                    got, need = short
                    raise ImageError(
                        f"{path}: truncated image data ({got:,} of the {need:,} bytes its {w}x{h} header needs)"
                    )
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
