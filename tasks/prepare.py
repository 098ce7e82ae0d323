"""Prepare stage: RGB shards -> model-size, Lab-normalized shards, per split, with dataset statistics.

Inputs per split: the upscaled low-res images (from the upscale stage) and the high-res images (from
the download stage). Square images are resized; others are resized so the short side fits, then
cropped (train: a seeded random crop; val/test: the centre), never squashed out of aspect.

Storage: one ``lab.npy`` per sample, float16, channels first ``(3, S, S)`` holding ``L/100`` and
``ab/110`` (model.lab's normalization): 6 bytes per pixel, 24,704 bytes per 64x64 sample with the npy
header, read straight into tensors by the training loop. float16 keeps ab to about 0.03 Lab units,
far below what the eye or the loss can see, and the conversion cost is paid once here, not per epoch.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import model.lab
import storage.shards
from flows.config import PipelineConfig
from model.lab import normalize, rgb8_to_lab
from model.metrics import colorfulness
from storage.shards import ShardWriter, decode_npy, decode_png, encode_npy, iter_samples, shard_paths
from storage.stage import StageResult, code_version, make_plan, run_stage

SPLITS = ("train", "val", "test")
CHUNK = 64


def plan_prepare(
    cfg: PipelineConfig, download: dict[str, Any], upscaled: dict[str, Any] | None, workdir: Path
) -> dict[str, Any]:
    inputs = [download] + ([upscaled] if upscaled else [])
    code = code_version(sys.modules[__name__], model.lab, storage.shards)
    return make_plan(workdir, "prepare", inputs, {"seed": cfg.seed, **cfg.prepare.model_dump()}, code)


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


def _sources(split: str, download: dict[str, Any], upscaled: dict[str, Any] | None) -> Iterator[tuple[str, Path]]:
    if upscaled is not None:
        yield from (("upscaled", p) for p in shard_paths(upscaled, f"upscaled-{split}"))
    else:  # no upscale stage in this run: low-res images are resized directly
        yield from (("lowres", p) for p in shard_paths(download, f"lowres-{split}"))
    yield from (("highres", p) for p in shard_paths(download, f"highres-{split}"))


def _flush(chunk: list[tuple[dict[str, Any], np.ndarray]], writer: ShardWriter, stats: dict[str, float]) -> None:
    rgb = torch.from_numpy(np.stack([img for _, img in chunk])).permute(0, 3, 1, 2)
    lab = rgb8_to_lab(rgb)
    l_norm, ab_norm = normalize(lab)
    packed = torch.cat((l_norm, ab_norm), dim=1).to(torch.float16).numpy()
    stats["a"] += float(lab[:, 1].mean(dim=(1, 2)).sum())
    stats["b"] += float(lab[:, 2].mean(dim=(1, 2)).sum())
    for (meta, img), arr in zip(chunk, packed, strict=True):
        stats["colorfulness"] += colorfulness(img)
        writer.write({"__key__": meta["__key__"], "lab.npy": encode_npy(arr), "json": meta["json"]})
    chunk.clear()


def run_prepare(
    plan: dict[str, Any],
    cfg: PipelineConfig,
    download: dict[str, Any],
    upscaled: dict[str, Any] | None,
    force: bool = False,
) -> StageResult:
    size = cfg.prepare.image_size

    def work(out: Path) -> dict[str, Any]:
        counts, stats_out = {}, {}
        for split in SPLITS:
            stats = {"a": 0.0, "b": 0.0, "colorfulness": 0.0}
            n = 0
            chunk: list[tuple[dict[str, Any], np.ndarray]] = []
            with ShardWriter(out, split, maxcount=cfg.prepare.shard_maxcount) as writer:
                for kind, shard in _sources(split, download, upscaled):
                    for s in iter_samples([shard]):
                        key = s["__key__"]
                        rng = None
                        if split == "train":
                            digest = hashlib.sha256(f"{cfg.seed}/{key}".encode()).digest()
                            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
                        meta = {**json.loads(s["json"]), "set": kind}
                        chunk.append(({"__key__": key, "json": meta}, fit(decode_png(s["png"]), size, rng)))
                        n += 1
                        if len(chunk) == CHUNK:
                            _flush(chunk, writer, stats)
                    if chunk:
                        _flush(chunk, writer, stats)
            counts[split] = n
            if n:
                stats_out[split] = {
                    "mean_a": round(stats["a"] / n, 4),
                    "mean_b": round(stats["b"] / n, 4),
                    "colorfulness": round(stats["colorfulness"] / n, 4),
                }
        if not counts["train"]:
            raise ValueError("the train split is empty: the dataset has too few images for the requested splits")
        return {
            "image_size": size,
            "counts": counts,
            "stats": stats_out,
            "format": "lab.npy float16 (3,S,S): L/100, a/110, b/110",
            "bytes_per_sample": 3 * size * size * 2 + 128,
        }

    return run_stage(plan, work, force=force)


def decode_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared sample -> (L/100 of shape (1,S,S), ab/110 of shape (2,S,S)) as float32 tensors."""
    arr = torch.from_numpy(decode_npy(sample["lab.npy"]).astype(np.float32))
    return arr[:1], arr[1:]
