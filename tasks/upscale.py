"""Upscale stage: low-res shards -> Real-ESRGAN x4 shards (32 -> 128), batched, resumable per shard.

Each input shard ``lowres-<split>-N.tar`` becomes ``upscaled-<split>-N.tar``; a finished output shard
(renamed into place only when complete) is not redone after a crash. Resizing to the model's input
size is the prepare stage's job: the original notebooks ran ``RRDBNet(scale=8)`` with x4 weights; here
it is x4, then resize.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm import tqdm

from model.realesrgan import SCALE, WeightsInfo, check_weights, resolve_weights
from model.upscaler import Backend, BicubicUpscaler, Upscaler, choose_backend, make_upscaler
from storage.code_identity import code_version
from storage.settings import Section
from storage.shards import SPLITS, ShardWriter, decode_png, encode_png, iter_samples, shard_paths
from storage.stage import StageResult, make_plan, run_stage

log = logging.getLogger(__name__)
STAGE = "upscale"


class Settings(Section):
    """The upscale section: which method (Real-ESRGAN, or bicubic to measure it against), which weights,
    which engine, how big a batch."""

    method: Literal["realesrgan", "bicubic"] = Field(
        "realesrgan", description="x4 upscaling of low-res images: Real-ESRGAN, or bicubic (the baseline)"
    )
    weights: str | None = Field(None, description="explicit RealESRGAN_x4plus .pth (else cache/download/ncnn)")
    backend: Backend = Field(
        "auto", description="auto: torch on a GPU, else ncnn (Winograd convolutions) when installed"
    )
    batch_size: int = Field(8, ge=1, le=4096)
    threads: int | None = Field(None, ge=1, le=1024)
    bf16: bool = Field(False, description="torch backend only")
    channels_last: bool = Field(True, description="torch backend only")
    shard_maxcount: int = Field(1000, ge=1)


def has_lowres(download: dict[str, Any]) -> bool:
    return any(download.get("sets", {}).get("lowres", {}).values())


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


def _batches(shard: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for sample in iter_samples([shard]):
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(plan: dict[str, Any], force: bool = False) -> StageResult:
    c = Settings.model_validate(plan["config"])
    download = plan["inputs"]["download"]

    def work(out: Path) -> dict[str, Any]:
        if c.threads:
            torch.set_num_threads(c.threads)
        backend, weights = plan["facts"]["backend"], plan["facts"]["weights"]
        upscaler: Upscaler = BicubicUpscaler()
        if weights is not None:
            info = WeightsInfo(**weights)
            upscaler = make_upscaler(info, backend, threads=c.threads, bf16=c.bf16, channels_last=c.channels_last)
        counts = {}
        jobs = [(split, s) for split in SPLITS for s in shard_paths(download, f"lowres-{split}")]
        total = sum(download["sets"]["lowres"].values())
        done = 0
        seconds, processed = 0.0, 0
        bar = tqdm(total=total, unit="img", desc="upscale x4", dynamic_ncols=True)
        for split, shard in jobs:
            index = int(shard.stem.rsplit("-", 1)[1])
            target = out / f"upscaled-{split}-{index:06d}.tar"
            n = sum(1 for _ in iter_samples([target])) if target.exists() else None
            if n is None:  # not finished before: (re)do the whole shard
                n = 0
                with ShardWriter(out, f"upscaled-{split}", maxcount=10**9, start_index=index) as writer:
                    for batch in _batches(shard, c.batch_size):
                        images = torch.from_numpy(np.stack([decode_png(s["png"]) for s in batch])).permute(0, 3, 1, 2)
                        t0 = time.perf_counter()
                        big = upscaler(images)
                        seconds += time.perf_counter() - t0
                        processed += len(batch)
                        for s, img in zip(batch, big.permute(0, 2, 3, 1).numpy(), strict=True):
                            writer.write({"__key__": s["__key__"], "png": encode_png(img), "json": s["json"]})
                        n += len(batch)
                        bar.update(len(batch))
            else:
                bar.update(n)
            counts[split] = counts.get(split, 0) + n
            done += n
        bar.close()
        ips = round(processed / seconds, 3) if seconds else None
        log.info("upscaled %d images (%s img/s, %s) with %s", done, ips, backend, c.method)
        return {
            "method": c.method,
            "weights": weights,
            "backend": backend,
            "sets": {"upscaled": counts},
            "images_per_second": ips,
            "scale": SCALE,
        }

    return run_stage(plan, work, force=force)
