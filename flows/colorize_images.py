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

from model.choices import DEFAULT_MODEL
from model.loading import Running, UsageError, load_engine
from storage.atomic import atomic_path
from storage.images import IMAGE_SUFFIXES, MAX_PIXELS, ImageError, find_images, load_photo

log = logging.getLogger(__name__)
_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}


load_net = load_engine  # the one loader is model.loading's; bench/ still imports it by this name


def model_summary(spec: str | None, workdir: Path, colorizer: PhotoColorizer) -> str:
    """Which model runs, and its test metrics (from the registry's version tags), for people to read."""
    from model.inference import engine_line

    target = spec or DEFAULT_MODEL
    engine = engine_line(colorizer.net)
    if not target.startswith("models:/") or "@" not in target:
        return f"Model: `{target}` (network input {colorizer.size} px, {engine})."
    from storage.tracking import Tracker

    name, alias = target.removeprefix("models:/").split("@", 1)
    version = Tracker(workdir).client.get_model_version_by_alias(name, alias)
    tags = dict(version.tags)
    metrics = ", ".join(
        f"{k.removeprefix('test_')} {float(v):.5g}" for k, v in sorted(tags.items()) if k.startswith("test_")
    )
    return (
        f"Model: **{name}** version **{version.version}** (alias `{alias}`, {tags.get('variant', '?')} fusion, "
        f"{tags.get('head', 'regression')} head, "
        f"{engine}). Test metrics: {metrics or 'none recorded'}; beats the grayscale baseline: "
        f"{tags.get('beats_baseline', '?')}."
    )


class PhotoColorizer:
    """The one photo pipeline of ``colorize image`` and ``colorize app``: read any image, optionally
    upscale a small one with Real-ESRGAN first, colorize keeping its own full-resolution L."""

    def __init__(self, net: Any, size: int, upscale_max: int = 256, max_pixels: int = MAX_PIXELS) -> None:
        self.net, self.size, self.upscale_max, self.max_pixels = net, size, upscale_max, max_pixels
        self._upscaler: Any = None

    @classmethod
    def load(
        cls,
        spec: str | None,
        workdir: Path,
        how: Running = Running(),  # noqa: B008 - frozen
        hinted: bool = False,
        **kw: Any,
    ) -> PhotoColorizer:
        net, size = load_engine(spec, workdir, how, hinted)
        return cls(net, size, **kw)

    def colorize_file(
        self, src: Path, upscale: bool, vividness: float | None = None, guidance: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(the photo as read, its colour version, its alpha or None); ``vividness`` for this photo only
        (a classification model's; the page's slider), else the loaded network's; ``guidance`` the user's
        hints (model.hints.Guidance; points in this photo's own pixels, before any upscaling)."""
        from model.inference import Hinted, colorize, with_vividness

        photo = load_photo(src, self.max_pixels)
        rgb, alpha = photo.rgb, photo.alpha
        net = with_vividness(self.net, vividness)
        if guidance:
            height, width = rgb.shape[:2]
            net = Hinted(net, guidance.inputs(getattr(net.spec, "hints", "off"), width, height, self.size))
        if upscale and max(rgb.shape[:2]) <= self.upscale_max:
            rgb, alpha = _upscale(self.upscaler(), rgb, alpha)
        return rgb, colorize(net, rgb, self.size), alpha

    def upscaler(self) -> Any:
        if self._upscaler is None:
            import torch

            from model.realesrgan import resolve_weights
            from model.upscaler import make_upscaler

            # one photo at a time: every thread works inside the image
            self._upscaler = make_upscaler(resolve_weights(), per_image_threads=torch.get_num_threads())
        return self._upscaler


def gather(inputs: list[str], out: str | None = None) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, its path relative to the input it came from) for every image, and one error per bad input.
    The output folder is never read as input, even inside an input folder: a rerun replaces its results
    instead of colorizing them again."""
    files, errors = [], []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = find_images(p, exclude=Path(out).expanduser() if out else None)
            files += [(f, f.relative_to(p)) for f in found]
            if not found:
                errors.append(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif p.exists():
            files.append((p, Path(p.name)))
        else:
            errors.append(f"{p}: no such file")
    return files, errors


def _writable(rel: Path) -> Path:
    """Keep the name where its format can be written (``b.JPG`` stays), else add ``.png`` (``a.gif.png``),
    so inputs that differ only in extension never meet at one output."""
    return rel if rel.suffix.lower() in _FORMATS else rel.with_name(rel.name + ".png")


def output_paths(files: list[tuple[Path, Path]], out: str | None, single: bool) -> list[Path]:
    """One distinct destination per input, keeping the folder layout; a UsageError when an output format
    cannot be written or a destination would overwrite an input."""
    if single and out and not Path(out).is_dir():
        dest = Path(out)
        if dest.suffix.lower() not in _FORMATS:
            kind = f"'{dest.suffix}' images" if dest.suffix else "a file with no image extension"
            raise UsageError(
                f"--out {out}: cannot write {kind}; use one of {', '.join(_FORMATS)} or an existing folder"
            )
        dests = [dest]
    else:
        folder = Path(out or "colorized")
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--out {out}: is a file; give a folder for several inputs")
        dests, taken = [], set()
        for _, rel in files:
            dest = folder / _writable(rel)
            n = 2
            while dest in taken:  # same relative name from two inputs: a.png and other/a.png given as files
                dest = dest.with_name(f"{Path(dest.stem).stem}-{n}{''.join(Path(dest.name).suffixes[-1:])}")
                n += 1
            taken.add(dest)
            dests.append(dest)
    inputs = {src.resolve() for src, _ in files}
    for (src, _), dest in zip(files, dests, strict=True):
        if dest.resolve() in inputs:
            raise UsageError(
                f"writing the result of {src} to {dest} would overwrite the input {dest}; choose another --out"
            )
    return dests


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
    files, errors = gather(args.inputs, args.out)
    single = len(files) == 1 and len(args.inputs) == 1 and not Path(args.inputs[0]).is_dir()
    dests = output_paths(files, args.out, single)  # a UsageError: exit 2 before anything is read
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not files:
        return 1 if errors else 2
    guidance = read_guidance(args)  # a bad point, file or reference: exit 2 before the model loads
    colorizer = PhotoColorizer.load(
        args.model, workdir, Running.from_args(args), max_pixels=args.max_pixels, hinted=bool(guidance)
    )  # a NoModel, a vividness for a regression model, an engine without hint inputs: exit 2
    colorizer.size = args.size or colorizer.size
    colorizer.upscale_max = args.upscale_max
    failed = len(errors)
    jobs = list(zip(files, dests, strict=True))
    for (src, _), dest in tqdm(jobs, unit="img", desc="colorize", disable=len(files) < 2):
        try:
            _, colour, alpha = colorizer.colorize_file(src, args.upscale, guidance=guidance)
            replaced = " (replaced the existing file)" if dest.exists() else ""
            save(colour, alpha, dest)
            tqdm.write(f"{src} -> {dest}{replaced}") if len(files) > 1 else print(f"{src} -> {dest}{replaced}")
        except (ImageError, OSError) as exc:
            failed += 1
            msg = str(exc) if str(exc).startswith(str(src)) else f"{src}: {exc}"
            tqdm.write(f"error: {msg}", file=sys.stderr)  # above the progress bar, one line
    return 1 if failed else 0


def read_guidance(args: argparse.Namespace) -> Any:
    """The hints of ``--hint``, ``--hints`` and ``--reference`` (model.hints.Guidance, empty without
    them), checked now: a malformed point or file, or a grey or unreadable reference, is one line."""
    hint_texts, hints_file = getattr(args, "hint", []), getattr(args, "hints", None)
    reference = getattr(args, "reference", None)
    if not (hint_texts or hints_file or reference):
        return None
    from model import hints

    points = [hints.parse_point(text) for text in hint_texts]
    if hints_file:
        try:
            data = Path(hints_file).expanduser().read_bytes()
        except OSError as exc:
            raise UsageError(f"--hints {hints_file}: {exc.strerror or exc}") from None
        points += hints.parse_json(data, f"--hints {hints_file}")
    palette = None
    if reference:
        try:
            palette = hints.reference_hint(load_photo(Path(reference).expanduser(), MAX_PIXELS).rgb)
        except (ImageError, OSError) as exc:
            raise UsageError(f"--reference {reference}: {exc}") from None
        except hints.HintError as exc:
            raise UsageError(f"--reference {reference}: {exc}") from None
    return hints.Guidance(tuple(points), palette)


def _upscale(upscaler: Any, rgb: np.ndarray, alpha: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    import torch

    from model.realesrgan import SCALE

    big = upscaler(torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    if alpha is not None:
        alpha = np.asarray(Image.fromarray(alpha).resize((alpha.shape[1] * SCALE, alpha.shape[0] * SCALE)))
    return big, alpha
