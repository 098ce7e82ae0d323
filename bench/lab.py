"""Benchmark: the prepare stage's batched Lab conversion of 8-bit images vs skimage.color.rgb2lab per image.

Prints throughput of both, the max absolute error (Lab units), and ``RATIO lab <value>`` last.

    .venv/bin/python bench/lab.py [--images 256] [--size 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from skimage import color, data

from model.lab import rgb8_to_lab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    s = args.size
    imgs = []
    for i in range(args.images):
        im = photos[i % 4]
        y, x = rng.integers(0, im.shape[0] - s), rng.integers(0, im.shape[1] - s)
        imgs.append(im[y : y + s, x : x + s])
    batch = np.stack(imgs)

    t0 = time.perf_counter()
    ref = np.stack([color.rgb2lab(im) for im in batch])
    t_ref = time.perf_counter() - t0

    x = torch.from_numpy(batch).permute(0, 3, 1, 2)
    rgb8_to_lab(x[:2])  # warm-up
    t0 = time.perf_counter()
    ours = torch.cat([rgb8_to_lab(x[i : i + args.chunk]) for i in range(0, len(x), args.chunk)])
    t_ours = time.perf_counter() - t0
    err = np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max()
    n = len(batch)
    print(f"{n} images {s}x{s}, threads {torch.get_num_threads()}")
    print(f"skimage.color.rgb2lab per image: {n / t_ref:.1f} img/s")
    print(f"batched torch, 8-bit table, chunk {args.chunk}: {n / t_ours:.1f} img/s")
    print(f"max abs error: {err:.2e} Lab units")
    print(f"RATIO lab {t_ref / t_ours:.3f}")


if __name__ == "__main__":
    main()
