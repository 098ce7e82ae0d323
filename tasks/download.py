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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator, model_validator

from storage.archives import extract
from storage.code_identity import code_version
from storage.errors import ConfigError, DataError
from storage.fetch import download
from storage.images import IMAGE_SUFFIXES, MAX_PIXELS, ImageError, find_images, load_photo
from storage.redact import has_userinfo
from storage.settings import Section
from storage.shard_sets import HIGHRES, LOWRES
from storage.stage import StageResult, digest, make_plan, run_stage

log = logging.getLogger(__name__)
STAGE = "download"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DIV2K_TRAIN_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip"
DIV2K_VALID_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip"

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


def _shorter_side(rgb: np.ndarray, side: int) -> np.ndarray:
    """The photo scaled so its shorter side is ``side`` (area averaging down, bicubic up)."""
    h, w = rgb.shape[:2]
    scale = side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(
        Image.fromarray(rgb).resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
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
        # Imported here, once per stage, not at the top: webdataset imports torch, and `colorize --help`
        # reads SOURCES from this module.
        from storage import shards

        self.shards, self.folder, self.maxcount = shards, folder, maxcount
        self.writers: dict[tuple[str, str], Any] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def write(self, set_name: str, split: str, key: str, rgb: np.ndarray, meta: dict[str, Any]) -> None:
        w = self.writers.get((set_name, split))
        if w is None:
            w = self.writers[(set_name, split)] = self.shards.ShardWriter(
                self.folder, f"{set_name}-{split}", self.maxcount
            )
        w.write({"__key__": key, "png": self.shards.encode_png(rgb), "json": {**meta, "split": split}})
        self.counts.setdefault(set_name, dict.fromkeys(self.shards.SPLITS, 0))[split] += 1

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


@dataclass
class Context:
    """What a source reads besides its settings: the run's seed, the download cache, the work dir."""

    seed: int
    cache: Path
    workdir: Path
    writers: _Writers


def _sample(d: Settings, ctx: Context) -> dict[str, Any]:
    writers = ctx.writers
    splits = split_groups([scene for _, scene, _, _ in SAMPLE_PHOTOS], ctx.seed, d.test_photos, d.val_photos)
    for idx, (name, scene, package, rel) in enumerate(SAMPLE_PHOTOS):
        rgb = load_photo(sample_photo_path(package, rel)).rgb
        split = splits[scene]
        rng = np.random.default_rng([ctx.seed, idx])
        meta = {"source": name, "scene": scene}
        for i, crop in enumerate(
            lowres_crops(rgb, rng, d.lowres_crops_per_photo, d.lowres_size, d.lowres_crop_fraction)
        ):
            writers.write(LOWRES, split, f"{name}-lo{i:05d}", crop, meta)
        for i, crop in enumerate(highres_crops(rgb, rng, d.highres_crops_per_photo, d.highres_size)):
            writers.write(HIGHRES, split, f"{name}-hi{i:05d}", crop, meta)
    return {"splits": splits, "photos": [p[0] for p in SAMPLE_PHOTOS]}


def _folder(d: Settings, ctx: Context) -> dict[str, Any]:
    root, writers = Path(d.path), ctx.writers
    files = find_images(root, exclude=ctx.workdir)
    if not files:
        raise ConfigError(f"no images found under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
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
    perm = np.random.default_rng(ctx.seed).permutation(n)
    split_of = {int(j): "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, j in enumerate(perm)}
    splits = {}
    for i, (rel, rgb) in enumerate(photos):
        split = splits[rel] = split_of[i]
        small = min(rgb.shape[:2]) < d.lowres_threshold
        key = hashlib.sha1(rel.encode()).hexdigest()[:16]
        shrink = small or (d.folder_lowres and split != "test")
        if not d.folder_crops_per_photo or small:
            image = _resize(center_square(rgb), d.lowres_size) if shrink else rgb
            writers.write(LOWRES if shrink else HIGHRES, split, key, image, {"source": rel})
            continue
        # Several crops per photo (all in the photo's split): more signal per photo for a small corpus.
        # Seeded by the run's seed and the photo's path, so adding a photo leaves the others' crops alone.
        rng = np.random.default_rng([ctx.seed, int(key[:12], 16)])
        scaled = _shorter_side(rgb, d.folder_photo_side) if d.folder_photo_side else rgb
        for j, crop in enumerate(highres_crops(scaled, rng, d.folder_crops_per_photo, d.highres_size)):
            meta = {"source": rel, "crop": j}
            if shrink:  # the same crops as without folder_lowres, shrunk (area filter)
                writers.write(LOWRES, split, f"{key}-{j:03d}", _resize(crop, d.lowres_size), meta)
            else:
                writers.write(HIGHRES, split, f"{key}-{j:03d}", crop, meta)
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


def cached_name(url: str, fallback: str) -> str:
    """The download cache's file name for ``url``: its basename prefixed by a hash of the whole URL, so
    two mirrors' files that share a basename (``train/HR.zip``, ``valid/HR.zip``) never share a file; a
    long basename is cut to a short stem (with its suffixes), so any URL makes a valid file name."""
    base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or fallback
    if len(base) > _NAME_CHARS:  # a file system allows ~255 bytes a name: keep a short stem and the suffixes
        suffix = "".join(Path(base).suffixes[-2:])[-16:]
        base = base[: _NAME_CHARS - len(suffix)] + suffix
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


_NAME_CHARS = 64  # the readable part of a cached download's name (the hash in front tells URLs apart)


def _cifar10(d: Settings, ctx: Context) -> dict[str, Any]:
    cache, writers = ctx.cache, ctx.writers
    name = cached_name(d.cifar10_url, "cifar-10-python.tar.gz")
    archive = download(d.cifar10_url, cache / name, md5=d.cifar10_md5, retries=d.retries, timeout=d.timeout)
    root = extract(archive, cache / name.removesuffix(".tar.gz")) / "cifar-10-batches-py"
    if not root.is_dir():
        raise DataError(f"{archive.name}: no cifar-10-batches-py folder inside; is this the CIFAR-10 python archive?")
    train = np.concatenate([read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)])
    test = read_cifar_batch(root / "test_batch")
    perm = np.random.default_rng(ctx.seed).permutation(len(train))
    n_val = max(1, round(len(train) * d.val_fraction))
    parts = {"val": perm[:n_val], "train": perm[n_val:], "test": np.arange(len(test))}
    for split, idx in parts.items():
        images = test if split == "test" else train
        for i in idx[: d.limit]:
            writers.write(LOWRES, split, f"cifar-{split}-{int(i):05d}", images[i], {"source": f"cifar10/{int(i)}"})
    return {"archive_md5": d.cifar10_md5}


def _div2k(d: Settings, ctx: Context) -> dict[str, Any]:
    cache, writers = ctx.cache, ctx.writers
    if d.div2k_train_url == d.div2k_valid_url:
        raise ConfigError(
            "download.div2k_train_url and download.div2k_valid_url are the same URL: "
            "the test split would be the training set"
        )
    recorded = {}
    groups = {}
    for part, url in (("train", d.div2k_train_url), ("valid", d.div2k_valid_url)):
        name = cached_name(url, f"DIV2K_{part}_HR.zip")
        archive = download(url, cache / name, retries=d.retries, timeout=d.timeout)
        base = name.split("-", 1)[1]  # the URL's own file name, for the manifest
        recorded[base if base not in recorded else f"{part}/{base}"] = (cache / f"{name}.sha256").read_text().split()[0]
        folder = extract(archive, cache / name.removesuffix(".zip"))
        groups[part] = find_images(folder)
        if not groups[part]:
            raise DataError(f"{name}: no images inside; is this a DIV2K HR archive?")
    perm = np.random.default_rng(ctx.seed).permutation(len(groups["train"]))
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
        writers.write(HIGHRES, split, f"div2k-{f.stem}", rgb, {"source": f"div2k/{f.name}"})
    return {"archive_sha256": recorded, "skipped": skipped, "skipped_count": len(skipped)}


def folder_fingerprint(root: Path, workdir: Path) -> str:
    """Names, sizes and mtimes of a user's folder: adding or editing a photo changes the stage key."""
    return digest(
        [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in find_images(root, workdir)]
    )


@dataclass(frozen=True)
class Source:
    """One dataset: a reader that writes shards through ``ctx.writers`` and returns manifest fields."""

    read: Callable[[Settings, Context], dict[str, Any]]
    description: str
    needs_path: bool = False


# The registry of datasets: the CLI's choices, the settings' validation and the stage all read it.
# Adding a dataset is one reader function above and one entry here.
SOURCES: dict[str, Source] = {
    "sample": Source(_sample, "real colour photos shipped in the scikit-image and scikit-learn wheels"),
    "folder": Source(_folder, "your own photos under --path, recursively", needs_path=True),
    "cifar10": Source(_cifar10, "CIFAR-10's python archive (32x32, low-res)"),
    "div2k": Source(_div2k, "DIV2K's HR train and valid archives (2K, high-res)"),
}
Dataset = Literal[tuple(SOURCES)]  # type: ignore[valid-type]


class Settings(Section):
    """The download section: where photos come from and how they are cut and split."""

    dataset: Dataset = Field("sample", description="which source to read (see SOURCES)")
    path: str | None = Field(None, description="folder of photos, for sources that read one")
    lowres_size: int = Field(32, ge=8, le=1024, description="side of the low-res (CIFAR-like) crops")
    lowres_crops_per_photo: int = Field(12, ge=0)
    lowres_crop_fraction: tuple[float, float] = (0.15, 0.5)
    highres_size: int = Field(192, ge=32, le=8192, description="side of the high-res (DIV2K-like) sample crops")
    highres_crops_per_photo: int = Field(16, ge=0)
    test_photos: int = Field(2, ge=1, description="sample: scenes held out for the test split")
    val_photos: int = Field(1, ge=1, description="sample: scenes held out for validation")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="cifar10/div2k/folder: share of train for val")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="folder: share of photos for test")
    lowres_threshold: int = Field(64, ge=1, description="folder: photos with a shorter side are low-res")
    folder_crops_per_photo: int = Field(
        0, ge=0, le=10_000, description="folder: 0 keeps each photo whole; N cuts N random highres_size crops"
    )
    folder_photo_side: int | None = Field(
        None, ge=32, le=16384, description="folder: scale each photo's shorter side to this before cutting crops"
    )
    folder_lowres: bool = Field(
        False,
        description="folder: shrink train and val images to lowres_size (the CIFAR setting: upscaled, then "
        "trained on); test images stay full size, so every upscaling method is scored on the same photos",
    )
    limit: int | None = Field(None, ge=1, description="cifar10/div2k: at most this many images per split")
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    cifar10_url: str = CIFAR10_URL
    cifar10_md5: str = CIFAR10_MD5
    div2k_train_url: str = DIV2K_TRAIN_URL
    div2k_valid_url: str = DIV2K_VALID_URL
    retries: int = Field(3, ge=0, le=100)
    timeout: float = Field(60.0, gt=0, le=3600, description="seconds without data before a download is abandoned")
    shard_maxcount: int = Field(1000, ge=1)

    @field_validator("cifar10_url", "div2k_train_url", "div2k_valid_url")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        if has_userinfo(v):
            raise ValueError(
                "credentials in a URL are never sent; put them in a netrc file ($NETRC or ~/.netrc: "
                "`machine HOST login USER password PASS`), which downloads use for that host"
            )
        return v

    @field_validator("lowres_crop_fraction")
    @classmethod
    def _fraction(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("must be (low, high) with 0 < low <= high <= 1")
        return v

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return str(Path(v).expanduser().resolve()) if v else None

    @model_validator(mode="after")
    def _path_fits_source(self) -> Settings:
        if SOURCES[self.dataset].needs_path and not self.path:
            raise ValueError(f"--dataset {self.dataset} needs --path DIR")
        return self


def plan(s: Settings, seed: int, workdir: Path) -> dict[str, Any]:
    """The download stage's plan. A folder source adds its fingerprint, so new or edited photos rerun it."""
    facts: dict[str, Any] = {"seed": seed}
    if s.path:
        root = Path(s.path)
        if not root.is_dir():
            raise ConfigError(f"--path {root}: no such folder")
        facts["fingerprint"] = folder_fingerprint(root, Path(workdir))
    return make_plan(workdir, STAGE, {}, s.for_stage(), code_version(__name__), facts)


def plans(s: Settings, seed: int, inputs: Mapping[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """The flow's view (flows/dag.py): one plan, under the stage's name; no inputs."""
    return {STAGE: plan(s, seed, workdir)}


def run(plan: dict[str, Any], force: bool = False) -> StageResult:
    s = Settings.model_validate(plan["config"])
    workdir = Path(plan["workdir"])

    def work(out: Path) -> dict[str, Any]:
        writers = _Writers(out, s.shard_maxcount)
        ctx = Context(plan["facts"]["seed"], workdir / "downloads", workdir, writers)
        extra = SOURCES[s.dataset].read(s, ctx)
        writers.close()
        return {"dataset": s.dataset, "seed": ctx.seed, "sets": writers.counts, **extra}

    return run_stage(plan, work, force=force)
