"""Download stage: any source -> RGB WebDataset shards in two sets, split without leakage.

Sets: ``lowres`` (small images such as CIFAR-10's 32x32, upscaled later by Real-ESRGAN) and ``highres``
(photos large enough to crop at the model's size, such as DIV2K). Splits: ``train``, ``val`` (the
validation loss during training) and ``test`` (evaluation only). Shards are named ``<set>-<split>-N.tar``;
each sample holds ``png`` (lossless RGB) and ``json`` (source photo, split).

The ``sample`` source uses real colour photos shipped inside the scikit-image and scikit-learn wheels,
so the pipeline runs offline; photos are split by *scene* (the two motorcycle photos are one stereo
scene), so no test crop comes from a photo seen in training.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import storage.images
import storage.shards
from flows.config import ConfigError, PipelineConfig
from storage.archives import extract
from storage.fetch import download
from storage.images import ImageError, find_images, load_photo
from storage.shards import ShardWriter, encode_png
from storage.stage import StageResult, code_version, digest, make_plan, run_stage

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")

# (name, scene, package, relative path): the embedded sample dataset.
SAMPLE_PHOTOS = (
    ("astronaut", "astronaut", "skimage", "data/astronaut.png"),
    ("chelsea", "chelsea", "skimage", "data/chelsea.png"),
    ("coffee", "coffee", "skimage", "data/coffee.png"),
    ("rocket", "rocket", "skimage", "data/rocket.jpg"),
    ("motorcycle_left", "motorcycle", "skimage", "data/motorcycle_left.png"),
    ("motorcycle_right", "motorcycle", "skimage", "data/motorcycle_right.png"),
    ("china", "china", "sklearn", "datasets/images/china.jpg"),
    ("flower", "flower", "sklearn", "datasets/images/flower.jpg"),
)


def sample_photo_path(package: str, rel: str) -> Path:
    mod = __import__(package)
    return Path(mod.__file__).parent / rel


def split_groups(groups: list[str], seed: int, n_test: int, n_val: int) -> dict[str, str]:
    """Assign whole groups (scenes, files) to splits with a seeded shuffle; train keeps at least one."""
    order = sorted(set(groups))
    if len(order) < n_test + n_val + 1:
        raise ConfigError(f"{len(order)} source photos cannot fill {n_test} test + {n_val} val + 1 train")
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    return {g: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, g in enumerate(order)}


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(rgb).resize(
            (size, size), Image.Resampling.BOX if rgb.shape[0] >= size else Image.Resampling.BICUBIC
        )
    )


def lowres_crops(
    rgb: np.ndarray, rng: np.random.Generator, n: int, size: int, fraction: tuple[float, float]
) -> Iterator[np.ndarray]:
    """Random square regions (a fraction of the short side) box-downscaled to ``size``: CIFAR-like
    images that show a whole object at low resolution, not a magnified patch."""
    h, w = rgb.shape[:2]
    for _ in range(n):
        side = max(size, int(min(h, w) * rng.uniform(*fraction)))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        yield _resize(rgb[y : y + side, x : x + side], size)


def highres_crops(rgb: np.ndarray, rng: np.random.Generator, n: int, size: int) -> Iterator[np.ndarray]:
    h, w = rgb.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        rgb = np.asarray(
            Image.fromarray(rgb).resize(
                (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC
            )
        )
        h, w = rgb.shape[:2]
    for _ in range(n):
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        yield np.ascontiguousarray(rgb[y : y + size, x : x + size])


def center_square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    return rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


class _Writers:
    """One shard writer per (set, split), opened on first use; counts per set and split."""

    def __init__(self, folder: Path, maxcount: int) -> None:
        self.folder, self.maxcount = folder, maxcount
        self.writers: dict[tuple[str, str], ShardWriter] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def write(self, set_name: str, split: str, key: str, rgb: np.ndarray, meta: dict[str, Any]) -> None:
        w = self.writers.get((set_name, split))
        if w is None:
            w = self.writers[(set_name, split)] = ShardWriter(self.folder, f"{set_name}-{split}", self.maxcount)
        w.write({"__key__": key, "png": encode_png(rgb), "json": {**meta, "split": split}})
        self.counts.setdefault(set_name, dict.fromkeys(SPLITS, 0))[split] += 1

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def _sample(cfg: PipelineConfig, writers: _Writers) -> dict[str, Any]:
    d = cfg.download
    splits = split_groups([scene for _, scene, _, _ in SAMPLE_PHOTOS], cfg.seed, d.test_photos, d.val_photos)
    for idx, (name, scene, package, rel) in enumerate(SAMPLE_PHOTOS):
        rgb = load_photo(sample_photo_path(package, rel)).rgb
        split = splits[scene]
        rng = np.random.default_rng([cfg.seed, idx])
        meta = {"source": name, "scene": scene}
        for i, crop in enumerate(
            lowres_crops(rgb, rng, d.lowres_crops_per_photo, d.lowres_size, d.lowres_crop_fraction)
        ):
            writers.write("lowres", split, f"{name}-lo{i:05d}", crop, meta)
        for i, crop in enumerate(highres_crops(rgb, rng, d.highres_crops_per_photo, d.highres_size)):
            writers.write("highres", split, f"{name}-hi{i:05d}", crop, meta)
    return {"splits": splits, "photos": [p[0] for p in SAMPLE_PHOTOS]}


def _folder(cfg: PipelineConfig, root: Path, writers: _Writers) -> dict[str, Any]:
    d = cfg.download
    files = find_images(root)
    if not files:
        raise ConfigError(
            f"no images found under {root} (looked for {', '.join(sorted(storage.images.IMAGE_SUFFIXES))})"
        )
    photos: list[tuple[str, np.ndarray]] = []
    skipped: list[dict[str, str]] = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            photo = load_photo(f, d.max_pixels)
        except ImageError as exc:
            skipped.append({"file": rel, "reason": str(exc).split(": ", 1)[-1]})
            continue
        if photo.grayscale:
            skipped.append({"file": rel, "reason": "grayscale: no colour to learn from"})
            continue
        photos.append((rel, photo.rgb))
    if not photos:
        raise ConfigError(
            f"none of the {len(files)} images under {root} is a usable colour photo "
            f"(first problem: {skipped[0]['file']}: {skipped[0]['reason']})"
        )
    n = len(photos)
    n_test = max(1, round(n * d.test_fraction)) if n >= 3 else 0
    n_val = max(1, round(n * d.val_fraction)) if n >= 3 else 0
    perm = np.random.default_rng(cfg.seed).permutation(n)
    split_of = {int(j): "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, j in enumerate(perm)}
    splits = {}
    for i, (rel, rgb) in enumerate(photos):
        split = splits[rel] = split_of[i]
        small = min(rgb.shape[:2]) < d.lowres_threshold
        image = _resize(center_square(rgb), d.lowres_size) if small else rgb
        key = hashlib.sha1(rel.encode()).hexdigest()[:16]
        writers.write("lowres" if small else "highres", split, key, image, {"source": rel})
    if n < 3:
        log.warning("only %d usable photos: all of them go to train, none to val/test", n)
    return {"splits": splits, "skipped": skipped, "skipped_count": len(skipped), "usable": n}


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow only what they contain (numpy arrays, builtins), so a
    tampered archive cannot run code even if it passed the checksum."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes through it
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR batch references {module}.{name}, which is not allowed")


def read_cifar_batch(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        batch = _CifarUnpickler(io.BufferedReader(fh), encoding="latin1").load()
    data = np.asarray(batch["data"], dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar10(cfg: PipelineConfig, cache: Path, writers: _Writers) -> dict[str, Any]:
    d = cfg.download
    archive = download(
        d.cifar10_url, cache / "cifar-10-python.tar.gz", md5=d.cifar10_md5, retries=d.retries, timeout=d.timeout
    )
    root = extract(archive, cache / "cifar-10-python") / "cifar-10-batches-py"
    if not root.is_dir():
        raise ValueError(f"{archive.name}: no cifar-10-batches-py folder inside; is this the CIFAR-10 python archive?")
    train = np.concatenate([read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)])
    test = read_cifar_batch(root / "test_batch")
    perm = np.random.default_rng(cfg.seed).permutation(len(train))
    n_val = max(1, round(len(train) * d.val_fraction))
    parts = {"val": perm[:n_val], "train": perm[n_val:], "test": np.arange(len(test))}
    for split, idx in parts.items():
        images = test if split == "test" else train
        for i in idx[: d.limit]:
            writers.write("lowres", split, f"cifar-{split}-{int(i):05d}", images[i], {"source": f"cifar10/{int(i)}"})
    return {"archive_md5": d.cifar10_md5}


def _div2k(cfg: PipelineConfig, cache: Path, writers: _Writers) -> dict[str, Any]:
    d = cfg.download
    recorded = {}
    groups = {}
    for part, url in (("train", d.div2k_train_url), ("valid", d.div2k_valid_url)):
        name = url.rstrip("/").rsplit("/", 1)[-1] or f"DIV2K_{part}_HR.zip"
        archive = download(url, cache / name, retries=d.retries, timeout=d.timeout)
        recorded[name] = (cache / f"{name}.sha256").read_text().split()[0]
        folder = extract(archive, cache / name.removesuffix(".zip"))
        groups[part] = find_images(folder)
        if not groups[part]:
            raise ValueError(f"{name}: no images inside; is this a DIV2K HR archive?")
    perm = np.random.default_rng(cfg.seed).permutation(len(groups["train"]))
    n_val = max(1, round(len(perm) * d.val_fraction))
    plan = [("val", groups["train"][i]) for i in perm[:n_val][: d.limit]]
    plan += [("train", groups["train"][i]) for i in perm[n_val:][: d.limit]]
    plan += [("test", f) for f in groups["valid"][: d.limit]]
    skipped = []
    for split, f in plan:
        try:
            rgb = load_photo(f, d.max_pixels).rgb
        except ImageError as exc:
            skipped.append({"file": f.name, "reason": str(exc).split(": ", 1)[-1]})
            continue
        writers.write("highres", split, f"div2k-{f.stem}", rgb, {"source": f"div2k/{f.name}"})
    return {"archive_sha256": recorded, "skipped": skipped, "skipped_count": len(skipped)}


def folder_fingerprint(root: Path) -> str:
    """Names, sizes and mtimes of a user's folder: adding or editing a photo changes the stage key."""
    return digest([(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in find_images(root)])


def download_config(cfg: PipelineConfig, dataset: str, path: Path | None) -> dict[str, Any]:
    key_cfg: dict[str, Any] = {"dataset": dataset, "seed": cfg.seed, **cfg.download.model_dump()}
    if dataset == "folder":
        key_cfg["path"] = str(path.resolve())
        key_cfg["fingerprint"] = folder_fingerprint(path)
    return key_cfg


def plan_download(cfg: PipelineConfig, dataset: str, workdir: Path, path: Path | None = None) -> dict[str, Any]:
    if dataset == "folder":
        if path is None:
            raise ConfigError("--dataset folder needs --path DIR")
        if not path.is_dir():
            raise ConfigError(f"--path {path}: no such folder")
    code = code_version(sys.modules[__name__], storage.images, storage.shards)
    return make_plan(workdir, "download", [], download_config(cfg, dataset, path), code)


def run_download(
    plan: dict[str, Any], cfg: PipelineConfig, dataset: str, path: Path | None = None, force: bool = False
) -> StageResult:
    cache = Path(plan["workdir"]) / "downloads"

    def work(out: Path) -> dict[str, Any]:
        writers = _Writers(out, cfg.download.shard_maxcount)
        if dataset == "sample":
            extra = _sample(cfg, writers)
        elif dataset == "folder":
            extra = _folder(cfg, path, writers)
        elif dataset == "cifar10":
            extra = _cifar10(cfg, cache, writers)
        elif dataset == "div2k":
            extra = _div2k(cfg, cache, writers)
        else:
            raise ConfigError(f"unknown dataset {dataset!r}")
        writers.close()
        return {"dataset": dataset, "seed": cfg.seed, "sets": writers.counts, **extra}

    return run_stage(plan, work, force=force)
