"""Prepare stage: RGB shards -> model-size, Lab-normalized shards, per split, with dataset statistics.

Inputs per split: the upscaled low-res images (from the upscale stage) and the high-res images (from
the download stage). Square images are resized; others are resized so the short side fits, then
cropped (train: a seeded random crop; val/test: the centre), never squashed out of aspect.

Storage: model.samples' format (one float16 Lab array per sample), written once here so training
never converts colour spaces.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model import ab_bins, samples
from model.metrics import colorfulness
from storage import locations
from storage.atomic import write_json
from storage.code_identity import code_version
from storage.errors import ConfigError
from storage.shard_runner import ShardJob, exchange, map_shards, run_exchanged, source
from storage.shard_sets import HIGHRES, LOWRES, UPSCALED
from storage.shards import SPLITS, ShardWriter, decode_png, iter_samples, shard_paths
from storage.stage import SCRATCH, StageResult, make_plan
from tasks.settings.prepare import Settings

STAGE = "prepare"
CHUNK = 64
PARTS = "parts"  # under scratch: one converted part per input shard, joined into the stage's shards at the end


def plan(
    s: Settings, seed: int, download: dict[str, Any], upscaled: dict[str, Any] | None, workdir: Path
) -> dict[str, Any]:
    inputs = {"download": download, "upscaled": upscaled}  # the plan's input names (in its key), not set names
    return make_plan(workdir, STAGE, inputs, s.for_stage(), code_version(__name__), {"seed": seed})


def plans(s: Settings, seed: int, inputs: Mapping[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """The flow's view (flows/dag.py): one plan over the download and, when it ran, the upscale stage."""
    return {STAGE: plan(s, seed, inputs["download"], inputs["upscale"], workdir)}


def fit(rgb: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Resize so the short side is ``size`` (area filter when shrinking), then crop a ``size`` square:
    random with ``rng``, centred without."""
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), resample))
    y = int(rng.integers(0, nh - size + 1)) if rng is not None else (nh - size) // 2
    x = int(rng.integers(0, nw - size + 1)) if rng is not None else (nw - size) // 2
    return np.ascontiguousarray(rgb[y : y + size, x : x + size])


def _sources(
    split: str, download: dict[str, Any], upscaled: dict[str, Any] | None
) -> Iterator[tuple[str, dict[str, Any], Path]]:
    """The split's input shards: (which set, the manifest of the stage holding it, its path)."""
    if upscaled is not None:
        yield from ((UPSCALED, upscaled, p) for p in shard_paths(upscaled, f"{UPSCALED}-{split}"))
    else:  # no upscale stage in this run: low-res images are resized directly
        yield from ((LOWRES, download, p) for p in shard_paths(download, f"{LOWRES}-{split}"))
    yield from ((HIGHRES, download, p) for p in shard_paths(download, f"{HIGHRES}-{split}"))


def _flush(chunk: list[tuple[dict[str, Any], np.ndarray]], writer: ShardWriter, stats: dict[str, Any]) -> None:
    rgb = torch.from_numpy(np.stack([img for _, img in chunk])).permute(0, 3, 1, 2)
    lab, encoded = samples.encode_batch(rgb)
    if "ab_counts" in stats:  # the train split's: the ab prior a classification head is rebalanced by
        stats["ab_counts"] = [
            x + int(y) for x, y in zip(stats["ab_counts"], ab_bins.histogram(lab[:, 1:]), strict=True)
        ]
    stats["a"] += float(lab[:, 1].mean(dim=(1, 2)).sum())
    stats["b"] += float(lab[:, 2].mean(dim=(1, 2)).sum())
    for (meta, img), field in zip(chunk, encoded, strict=True):
        stats["colorfulness"] += colorfulness(img)
        writer.write({"__key__": meta["__key__"], samples.FIELD: field, "json": meta["json"]})
    chunk.clear()


@dataclass(frozen=True)
class PartJob(ShardJob):
    """One input shard (``kind``: upscaled, lowres or highres) to convert into part ``part`` of its split."""

    kind: str
    part: int

    @property
    def name(self) -> str:
        return f"prepare {self.split} {self.kind} shard {self.index:06d}"


def prepare_part(job: PartJob) -> dict[str, float]:
    """Convert one input shard into ``scratch/parts/part-<split>-<part>.tar`` and return its statistics
    (kept beside it, so a part finished before a crash is not redone). The same function runs here or
    on a Dask worker; the parts are joined in a fixed order afterwards, so the stage's shards are the same
    bytes wherever, and in whatever order, the parts were made."""
    folder = locations.join(job.out, SCRATCH, PARTS)
    stats_name = f"part-{job.split}-{job.part:06d}.json"
    if locations.exists(done := locations.join(folder, stats_name)):
        return json.loads(locations.read_bytes(done))
    size, seed = Settings.model_validate(job.plan["config"]).image_size, job.plan["facts"]["seed"]
    stats: dict[str, Any] = {"n": 0, "a": 0.0, "b": 0.0, "colorfulness": 0.0}
    if job.split == "train":
        stats["ab_counts"] = [0] * len(ab_bins.bins())
    chunk: list[tuple[dict[str, Any], np.ndarray]] = []
    with (
        locations.local_copy(job.shard, job.sha256) as shard,
        locations.writing_into(folder) as local,
        ShardWriter(local, f"part-{job.split}", maxcount=10**9, maxsize=2**62, start_index=job.part) as writer,
    ):
        for s in iter_samples([shard]):
            key = s["__key__"]
            rng = None
            if job.split == "train":
                digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
                rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            meta = {**json.loads(s["json"]), "set": job.kind}
            chunk.append(({"__key__": key, "json": meta}, fit(decode_png(s["png"]), size, rng)))
            stats["n"] += 1
            if len(chunk) == CHUNK:
                _flush(chunk, writer, stats)
        if chunk:
            _flush(chunk, writer, stats)
    with locations.writing_into(folder) as local:  # after the part: the statistics say it is finished
        write_json(local / stats_name, stats)
    return stats


def run(
    plan: dict[str, Any], force: bool = False, runner: dict[str, Any] | None = None, store: str | None = None
) -> StageResult:
    """Convert every input shard (in this process, or one Prefect task per shard on Dask: ``runner``,
    through the stage ``store`` when there is one), then join each split's parts, in input order, into
    shards of ``shard_maxcount`` samples."""
    settings = Settings.model_validate(plan["config"])
    download, upscaled = plan["inputs"]["download"], plan["inputs"]["upscaled"]

    remote = exchange(runner, store, STAGE, plan["key"])

    def work(out: Path) -> dict[str, Any]:
        sources = [(split, kind, m, p) for split in SPLITS for kind, m, p in _sources(split, download, upscaled)]
        jobs = [
            PartJob(plan, remote or str(out), split, kind=kind, part=i, **source(m, p, store if remote else None))
            for i, (split, kind, m, p) in enumerate(sources)
        ]
        parts = map_shards(runner, prepare_part, jobs, [j.name for j in jobs])
        if remote:  # what the workers uploaded: every part's statistics, and the part where it has samples
            names = [f"part-{j.split}-{j.part:06d}" for j in jobs]
            made = [f"{n}.json" for n in names] + [f"{n}.tar" for n, st in zip(names, parts, strict=True) if st["n"]]
            locations.download(locations.join(remote, SCRATCH, PARTS), made, out / SCRATCH / PARTS)
        counts, stats_out = {}, {}
        for split in SPLITS:
            mine = [(job, stats) for job, stats in zip(jobs, parts, strict=True) if job.split == split]
            with ShardWriter(out, split, maxcount=settings.shard_maxcount) as writer:
                for job, stats in mine:
                    part = out / SCRATCH / PARTS / f"part-{split}-{job.part:06d}.tar"
                    for s in iter_samples([part]) if stats["n"] else ():  # an empty input makes no part
                        writer.write(
                            {"__key__": s["__key__"], samples.FIELD: s[samples.FIELD], "json": json.loads(s["json"])}
                        )
            n = counts[split] = sum(int(stats["n"]) for _, stats in mine)
            if n:
                stats_out[split] = {
                    name: round(sum(stats[k] for _, stats in mine) / n, 4)
                    for name, k in (("mean_a", "a"), ("mean_b", "b"), ("colorfulness", "colorfulness"))
                }
        if not counts["train"]:
            raise ConfigError("the train split is empty: the dataset has too few images for the requested splits")
        train_parts = [stats for job, stats in zip(jobs, parts, strict=True) if job.split == "train"]
        ab_counts = [sum(column) for column in zip(*(stats["ab_counts"] for stats in train_parts), strict=True)]
        return {
            # The train split's pixels per quantized-ab bin (model.ab_bins, in the order of its bins).
            "ab_prior": {"grid": ab_bins.GRID, "bins": len(ab_counts), "counts": ab_counts},
            "image_size": settings.image_size,
            "counts": counts,
            "stats": stats_out,
            "format": samples.DESCRIPTION,
            "bytes_per_sample": samples.bytes_per_sample(settings.image_size),
        }

    return run_exchanged(plan, work, force, remote)
