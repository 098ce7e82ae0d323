"""WebDataset shards: bounded, atomically renamed on completion, read back in a reproducible order.

A shard is written to a temp name and renamed to ``<prefix>-NNNNNN.tar`` only once closed, so a shard
under its final name is always complete; a killed writer leaves only a temp file that stage cleanup
removes. Readers shuffle with an explicit seed (shards, then a sample buffer), or keep the fixed order.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from storage.atomic import fsync_dir, temp_name

SPLITS = ("train", "val", "test")  # every stage's shards are per split: <set>-<split>-NNNNNN.tar
SHARD_MAXCOUNT = 1000
SHARD_MAXSIZE = 256 * 1024 * 1024


class ShardWriter:
    """Write samples (dicts with ``__key__`` and encoded fields) into count- and size-bounded shards."""

    def __init__(
        self,
        folder: Path | str,
        prefix: str,
        maxcount: int = SHARD_MAXCOUNT,
        maxsize: int = SHARD_MAXSIZE,
        start_index: int = 0,
    ) -> None:
        if maxcount < 1 or maxsize < 1:
            raise ValueError("shard bounds must be positive")
        self.folder, self.prefix = Path(folder), prefix
        self.maxcount, self.maxsize = maxcount, maxsize
        self.index = start_index
        self.shards: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._stream: Any = None
        self._tmp: Path | None = None
        self._count = 0
        self._size = 0
        self.folder.mkdir(parents=True, exist_ok=True)

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        self._tmp = temp_name(self.folder / self.shard_name(self.index))
        self._stream = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close
        self._tar = wds.TarWriter(self._stream, mtime=0.0)  # fixed mtime: same samples, same bytes
        self._count = self._size = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        final = self.folder / self.shard_name(self.index)
        os.replace(self._tmp, final)
        fsync_dir(self.folder)
        self.shards.append({"name": final.name, "count": self._count})
        self.index += 1
        self._tar = self._stream = self._tmp = None

    def write(self, sample: dict[str, Any]) -> None:
        size = sum(len(v) for k, v in sample.items() if isinstance(v, bytes | bytearray))
        if self._tar is not None and (self._count >= self.maxcount or self._size + size > self.maxsize):
            self._close()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        self._size += size

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its temp file), keep the finished ones."""
        if self._tar is not None:
            with contextlib.suppress(Exception):
                self._tar.close()
            self._stream.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = self._stream = self._tmp = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(folder: Path, prefix: str, samples: Iterable[dict[str, Any]], **bounds: int) -> list[dict]:
    with ShardWriter(folder, prefix, **bounds) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.shards


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def iter_samples(
    shards: Iterable[Path | str],
    *,
    seed: int | None = None,
    buffer: int = 1000,
    skip: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[dict[str, Any]]:
    """Raw samples from shards. ``seed=None``: file order. Otherwise shards and a buffer of samples are
    shuffled with ``random.Random(seed)``, so the same seed always gives the same order. ``skip`` drops
    the first samples without decoding them (resuming mid-epoch).

    ``rank``/``world`` split that one order by sample index (``i % world == rank``, counted from the
    start, ``skip`` included), not by shard: every rank then holds the same number of samples, give or
    take one, whatever the shard count, so ranks stay in step (a split by shard stalls the ranks that
    run out first whenever shards do not divide evenly). Rank r's k-th sample is the global sample
    ``k * world + r``: a per-rank batch of b is its share of the global batch of ``b * world``."""
    urls = [str(s) for s in shards]
    stages: list[Any] = []
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(urls)
        stages = [wds.shuffle(buffer, initial=min(buffer, 100), rng=rng)]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), *stages)
    for i, sample in enumerate(pipeline):
        if i >= skip and i % world == rank:
            yield sample


class ShardDataset(IterableDataset):
    """A torch IterableDataset over shards with a reproducible, per-epoch shuffle.

    ``set_epoch(e)`` reseeds with ``seed + e`` (the DistributedSampler convention), and ``skip`` resumes
    mid-epoch from a checkpoint's data position (in samples of the global order). ``rank``/``world``:
    this process's share of that order (see :func:`iter_samples`).

    DataLoader workers: with ``batch`` given, worker w of n decodes only the batches ``w, w + n, ...`` of
    this process's order. The DataLoader takes one batch from each worker in turn, so the batches arrive
    in exactly the order a loader without workers gives (each worker reads every sample's bytes to keep
    the shuffle, but decodes only its own).
    """

    def __init__(
        self,
        shards: Iterable[Path | str],
        decode: Callable[[dict[str, Any]], Any],
        seed: int | None = None,
        buffer: int = 1000,
        rank: int = 0,
        world: int = 1,
        batch: int | None = None,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.shards = [str(s) for s in shards]
        self.decode, self.seed, self.buffer = decode, seed, buffer
        self.rank, self.world, self.batch = rank, world, batch
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[Any]:
        seed = None if self.seed is None else self.seed + self.epoch
        samples = iter_samples(
            self.shards, seed=seed, buffer=self.buffer, skip=self.skip, rank=self.rank, world=self.world
        )
        worker = get_worker_info()
        if worker is None or worker.num_workers == 1:
            yield from map(self.decode, samples)
            return
        if self.batch is None:
            raise ValueError("DataLoader workers over a ShardDataset need its batch size (batch=...)")
        for i, sample in enumerate(samples):
            if (i // self.batch) % worker.num_workers == worker.id:
                yield self.decode(sample)


def shard_paths(manifest: dict[str, Any], prefix: str) -> list[Path]:
    """Finished shards of one set/split, from a stage manifest (never a directory listing)."""
    folder = Path(manifest["folder"])
    return [
        folder / name for name in sorted(manifest["files"]) if name.startswith(prefix + "-") and name.endswith(".tar")
    ]
