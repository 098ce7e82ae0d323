"""Upscale stage: low-res shards -> Real-ESRGAN x4 shards (32 -> 128), batched, resumable per shard.

Each input shard ``lowres-<split>-N.tar`` becomes ``upscaled-<split>-N.tar``; a finished output shard
(renamed into place only when complete) is not redone after a crash. Resizing to the model's input
size is the prepare stage's job: the original notebooks ran ``RRDBNet(scale=8)`` with x4 weights; here
it is x4, then resize.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.realesrgan import SCALE, WeightsInfo, check_weights, resolve_weights
from model.upscaler import BicubicUpscaler, Upscaler, choose_backend, make_upscaler
from storage import locations
from storage.code_identity import code_version
from storage.shard_runner import ShardJob, exchange, map_shards, run_exchanged, source
from storage.shard_sets import LOWRES, UPSCALED
from storage.shards import SPLITS, ShardWriter, decode_png, encode_png, iter_samples, shard_paths
from storage.stage import StageError, StageResult, make_plan, sha256_file
from tasks.settings.upscale import Settings

log = logging.getLogger(__name__)
STAGE = "upscale"


def has_lowres(download: dict[str, Any]) -> bool:
    return any(download.get("sets", {}).get(LOWRES, {}).values())


def preflight(s: Settings) -> None:
    """A user-given weights file must exist and be RealESRGAN_x4plus: refused before any work."""
    if s.weights and s.method == "realesrgan":
        check_weights(resolve_weights(s.weights))


def plan(s: Settings, download: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Facts resolved now, so the key covers them: the weights' sha256 (dropping the official file into
    the cache changes the output) and the engine actually used (torch and ncnn agree within 1/255, not
    bit for bit). A weights file that is not RealESRGAN_x4plus is refused here, before any work."""
    if s.method == "bicubic":
        facts: dict[str, Any] = {"backend": "bicubic", "weights": None}
    else:
        facts = {"backend": choose_backend(s.backend), "weights": resolve_weights(s.weights).as_dict()}
    return make_plan(workdir, STAGE, {"download": download}, s.for_stage(), code_version(__name__), facts)


def plans(s: Settings, seed: int, inputs: Mapping[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """The flow's view (flows/dag.py): one plan when the download holds low-res crops, none otherwise
    (a high-res-only source skips Real-ESRGAN)."""
    return {STAGE: plan(s, inputs["download"], workdir)} if has_lowres(inputs["download"]) else {}


def _batches(shard: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for sample in iter_samples([shard]):
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class UpscaleJob(ShardJob):
    """One input shard to upscale into the stage's (partial) folder."""

    @property
    def name(self) -> str:
        return f"upscale {self.split} shard {self.index}"


@functools.cache
def _upscaler(method: str, weights: str | None, backend: str, threads: int | None, bf16: bool, cl: bool) -> Upscaler:
    """One upscaler per process (and per Dask worker), loaded once for all the shards it runs."""
    if method == "bicubic":
        return BicubicUpscaler()
    info = _weights_here(WeightsInfo(**json.loads(weights or "null")))
    return make_upscaler(info, backend, threads=threads, bf16=bf16, channels_last=cl)


def _weights_here(planned: WeightsInfo) -> WeightsInfo:
    """The planned weights on this machine: a Dask worker elsewhere has its own cache, so the file is
    found by content (the planned sha256), not by the planning machine's path."""
    if Path(planned.path).is_file() and sha256_file(Path(planned.path)) == planned.sha256:
        return planned
    here = resolve_weights()  # this machine's cache, the download, or the ncnn conversion
    if here.sha256 != planned.sha256:
        raise StageError(
            f"this machine's Real-ESRGAN weights ({here.path}, sha256 {here.sha256[:12]}...) are not the run's "
            f"(sha256 {planned.sha256[:12]}...): copy the run's {Path(planned.path).name} to {here.path}"
        )
    return here


def upscale_shard(job: UpscaleJob) -> dict[str, Any]:
    """Upscale one shard into ``upscaled-<split>-<index>.tar`` (renamed into place when complete), or
    count it if a previous attempt finished it. The same function runs in this process or in a Dask
    worker, so the output does not depend on where it ran."""
    c = Settings.model_validate(job.plan["config"])
    facts = job.plan["facts"]
    if c.threads:
        torch.set_num_threads(c.threads)
    name = f"{UPSCALED}-{job.split}-{job.index:06d}.tar"
    target = locations.join(job.out, name)
    if locations.exists(target):
        with locations.local_copy(target) as done:
            n = sum(1 for _ in iter_samples([done]))
        return {"split": job.split, "file": name, "n": n, "seconds": 0.0, "processed": 0}
    weights = json.dumps(facts["weights"], sort_keys=True) if facts["weights"] else None
    upscaler = _upscaler(c.method, weights, facts["backend"], c.threads, c.bf16, c.channels_last)
    n, seconds = 0, 0.0
    with (
        locations.local_copy(job.shard, job.sha256) as shard,
        locations.writing_into(job.out) as out,
        ShardWriter(out, f"{UPSCALED}-{job.split}", maxcount=10**9, start_index=job.index) as writer,
        tqdm(unit="img", desc=job.name, dynamic_ncols=True, leave=False) as bar,
    ):
        for batch in _batches(shard, c.batch_size):
            images = torch.from_numpy(np.stack([decode_png(s["png"]) for s in batch])).permute(0, 3, 1, 2)
            t0 = time.perf_counter()
            big = upscaler(images)
            seconds += time.perf_counter() - t0
            for s, img in zip(batch, big.permute(0, 2, 3, 1).numpy(), strict=True):
                writer.write({"__key__": s["__key__"], "png": encode_png(img), "json": s["json"]})
            n += len(batch)
            bar.update(len(batch))
    return {"split": job.split, "file": name if n else None, "n": n, "seconds": seconds, "processed": n}


def run(
    plan: dict[str, Any], force: bool = False, runner: dict[str, Any] | None = None, store: str | None = None
) -> StageResult:
    """Upscale every low-res shard, one shard job each: in this process, or as one Prefect task per
    shard on a Dask cluster (``runner``, see storage.shard_runner), whose workers read and write through
    the stage ``store`` when there is one. A shard finished before a crash is kept; the stage folder and
    manifest are assembled here either way."""
    c = Settings.model_validate(plan["config"])
    download = plan["inputs"]["download"]
    _upscaler.cache_clear()  # this process's engine is rebuilt per run: the weights file may have changed

    remote = exchange(runner, store, STAGE, plan["key"])

    def work(out: Path) -> dict[str, Any]:
        shards = [(split, s) for split in SPLITS for s in shard_paths(download, f"{LOWRES}-{split}")]
        jobs = [
            UpscaleJob(plan, remote or str(out), split, **source(download, s, store if remote else None))
            for split, s in shards
        ]
        results = map_shards(runner, upscale_shard, jobs, [j.name for j in jobs])
        if remote:
            locations.download(remote, [r["file"] for r in results if r["file"]], out)
        counts: dict[str, int] = {}
        for r in results:
            counts[r["split"]] = counts.get(r["split"], 0) + r["n"]
        seconds, processed = sum(r["seconds"] for r in results), sum(r["processed"] for r in results)
        ips = round(processed / seconds, 3) if seconds else None
        backend = plan["facts"]["backend"]
        log.info("upscaled %d images (%s img/s, %s) with %s", sum(counts.values()), ips, backend, c.method)
        return {
            "method": c.method,
            "weights": plan["facts"]["weights"],
            "backend": backend,
            "sets": {UPSCALED: counts},
            "images_per_second": ips,
            "scale": SCALE,
        }

    return run_exchanged(plan, work, force, remote)
