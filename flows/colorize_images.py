"""``colorize image``: users' photos through the registered champion (or a given model).

Every file is tried: a bad one gets a one-line ``error: FILE: reason`` on stderr and the others go on;
the exit code is 1 if any file failed, 2 if nothing could start (no model). Outputs are written under a
temp name and renamed, as PNG or JPEG by extension; transparency is kept where the format can hold it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from storage.atomic import atomic_path
from storage.images import IMAGE_SUFFIXES, ImageError, find_images, load_photo

log = logging.getLogger(__name__)
DEFAULT_MODEL = "models:/colorizer@champion"
_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}


class NoModel(Exception):
    """No usable model: the message says how to get one."""


def load_net(spec: str | None, workdir: Path) -> tuple[Any, int]:
    """(network, its input size) from a models:/ or runs:/ URI, or a trained stage folder."""
    target = spec or DEFAULT_MODEL
    local = Path(target).expanduser()
    if local.is_dir() or local.suffix == ".pt":
        folder = local if local.is_dir() else local.parent
        from tasks.train import MODEL_FILE, SPEC_FILE, load_model

        if not (folder / MODEL_FILE).is_file() or not (folder / SPEC_FILE).is_file():
            raise NoModel(f"{local}: expected a trained stage folder with {MODEL_FILE} and {SPEC_FILE}")

        net = load_model(folder)
        return net, net.spec.image_size
    import mlflow

    from storage.tracking import tracking_uri

    if spec is None and tracking_uri(workdir).startswith("sqlite:///") and not (workdir / "mlflow.db").is_file():
        raise NoModel(
            f"no registered model {DEFAULT_MODEL}: {workdir} has no MLflow store yet; train one with "
            f"`colorize run --dataset sample --workdir {workdir}` or pass --model"
        )

    mlflow.set_tracking_uri(tracking_uri(workdir))
    mlflow.set_registry_uri(tracking_uri(workdir))
    try:
        model = mlflow.pyfunc.load_model(target)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for "not there"
        if spec is None:
            raise NoModel(
                f"no registered model {DEFAULT_MODEL} in {workdir / 'mlflow.db'}; train one with "
                f"`colorize run --dataset sample --workdir {workdir}` or pass --model"
            ) from None
        raise NoModel(f"cannot load model {target}: {str(exc).splitlines()[0]}") from None
    inner = model.unwrap_python_model()
    return inner.net, inner.spec.image_size


def gather(inputs: list[str]) -> tuple[list[Path], list[str]]:
    files, errors = [], []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = find_images(p)
            files += found
            if not found:
                errors.append(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif p.exists():
            files.append(p)
        else:
            errors.append(f"{p}: no such file")
    return files, errors


def output_path(src: Path, out: str | None, single: bool) -> Path:
    if out and single and Path(out).suffix.lower() in _FORMATS:
        return Path(out)
    folder = Path(out or "colorized")
    suffix = src.suffix.lower() if src.suffix.lower() in _FORMATS else ".png"
    return folder / f"{src.stem}{suffix}"


def save(img: np.ndarray, alpha: np.ndarray | None, dest: Path) -> None:
    fmt = _FORMATS.get(dest.suffix.lower())
    if fmt is None:
        raise ImageError(f"{dest}: unsupported output type (use .png or .jpg)")
    im = Image.fromarray(img)
    if alpha is not None and fmt in ("PNG", "WEBP", "TIFF"):
        im.putalpha(Image.fromarray(alpha))
    with atomic_path(dest) as tmp:
        im.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def colorize_files(args: argparse.Namespace, workdir: Path) -> int:
    from model.inference import colorize

    files, errors = gather(args.inputs)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not files:
        return 1 if errors else 2
    try:
        net, size = load_net(args.model, workdir)
    except NoModel as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = args.size or size
    if size % 32:
        print(f"error: --size must be a multiple of 32, got {size}", file=sys.stderr)
        return 2
    upscaler = None
    failed = len(errors)
    single = len(files) == 1 and len(args.inputs) == 1
    for src in tqdm(files, unit="img", desc="colorize", disable=len(files) < 2):
        try:
            photo = load_photo(src, args.max_pixels)
            rgb = photo.rgb
            if args.upscale and max(rgb.shape[:2]) <= args.upscale_max:
                if upscaler is None:
                    import torch

                    from model.realesrgan import resolve_weights
                    from model.upscaler import make_upscaler

                    # one photo at a time: every thread works inside the image
                    upscaler = make_upscaler(resolve_weights(), per_image_threads=torch.get_num_threads())
                rgb, photo.alpha = _upscale(upscaler, rgb, photo.alpha)
            dest = output_path(src, args.out, single)
            save(colorize(net, rgb, size), photo.alpha, dest)
            tqdm.write(f"{src} -> {dest}") if len(files) > 1 else print(f"{src} -> {dest}")
        except (ImageError, OSError) as exc:
            failed += 1
            msg = str(exc) if str(exc).startswith(str(src)) else f"{src}: {exc}"
            tqdm.write(f"error: {msg}", file=sys.stderr)  # above the progress bar, one line
    return 1 if failed else 0


def _upscale(upscaler: Any, rgb: np.ndarray, alpha: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    import torch

    from model.realesrgan import SCALE

    big = upscaler(torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    if alpha is not None:
        alpha = np.asarray(Image.fromarray(alpha).resize((alpha.shape[1] * SCALE, alpha.shape[0] * SCALE)))
    return big, alpha
