"""Benchmark: this stage's training throughput vs the original notebooks' loop, same model, same images.

Baseline (the notebooks' way): RGB images resized and Lab-converted one by one with scikit-image inside
the loop, batch 8, fp32, default memory format, plain Adam. This stage: prepared float16 Lab shards read
by the shard DataLoader, channels_last, fused Adam. Both train the same ResNet50 + DenseNet121 concat
colorizer at 128 px. Also times the data loader alone, to show the step is compute-bound.
Last line: ``RATIO train <value>``.

    .venv/bin/python bench/train.py [--steps 6] [--size 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from skimage import color, transform
from torch.utils.data import DataLoader

from flows.config import build_config
from model.colorizer import Colorizer, ColorizerSpec
from storage.shards import ShardDataset, decode_png, iter_samples, shard_paths
from tasks.download import plan_download, run_download
from tasks.prepare import decode_sample, plan_prepare, run_prepare
from tasks.train import make_optimizer


def notebook_batches(pngs: list[bytes], size: int, batch: int):
    """The original loop: decode, resize and convert each image with scikit-image, then stack."""
    i = 0
    while True:
        ls, abs_ = [], []
        for _ in range(batch):
            rgb = decode_png(pngs[i % len(pngs)])
            i += 1
            rgb = transform.resize(rgb, (size, size), anti_aliasing=True)
            lab = color.rgb2lab(rgb)
            ls.append(torch.from_numpy(lab[..., :1].transpose(2, 0, 1) / 100.0).float())
            abs_.append(torch.from_numpy(lab[..., 1:].transpose(2, 0, 1) / 110.0).float())
        yield torch.stack(ls), torch.stack(abs_)


def step_loop(
    net: torch.nn.Module, opt: torch.optim.Optimizer, batches, steps: int, channels_last: bool
) -> tuple[float, float]:
    """(images/s, seconds spent producing batches) over ``steps`` steps after one warm-up step."""
    it = iter(batches)
    n, t_data, t0 = 0, 0.0, None
    for i in range(steps + 1):
        td = time.perf_counter()
        l_norm, ab = next(it)
        if channels_last:
            l_norm = l_norm.contiguous(memory_format=torch.channels_last)
        if i:
            t_data += time.perf_counter() - td
        loss = torch.nn.functional.mse_loss(net(l_norm), ab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 0:
            t0 = time.perf_counter()
        else:
            n += len(ab)
    return n / (time.perf_counter() - t0), t_data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        cfg = build_config(
            "demo",
            [
                "download.lowres_crops_per_photo=0",
                "download.highres_crops_per_photo=6",
                f"download.highres_size={args.size + 32}",
                f"prepare.image_size={args.size}",
            ],
        )
        dl = run_download(plan_download(cfg, "sample", wd), cfg, "sample").manifest
        prep = run_prepare(plan_prepare(cfg, dl, None, wd), cfg, dl, None).manifest
        pngs = [s["png"] for s in iter_samples(shard_paths(dl, "highres-train"))]

        def ours():
            ds = ShardDataset(shard_paths(prep, "train"), decode_sample, seed=0)
            epoch = 0
            while True:
                ds.set_epoch(epoch)
                yield from DataLoader(ds, batch_size=args.batch, drop_last=True)
                epoch += 1

        spec = ColorizerSpec(fusion="concat", decoder_width=64, image_size=args.size)
        torch.manual_seed(0)
        base_net = Colorizer(spec).train()
        base_opt = torch.optim.Adam(base_net.parameters(), lr=1e-4)  # the notebooks' plain Adam
        base_ips, base_data = step_loop(
            base_net, base_opt, notebook_batches(pngs, args.size, args.batch), args.steps, False
        )
        torch.manual_seed(0)
        our_net = Colorizer(spec).to(memory_format=torch.channels_last).train()
        our_ips, our_data = step_loop(our_net, make_optimizer(our_net, 1e-4), ours(), args.steps, True)

        loader_only = ours()
        next(loader_only)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(loader_only)
        t_loader = (time.perf_counter() - t0) / args.steps
    step_s = args.batch / our_ips
    print(f"model: ResNet50 + DenseNet121 concat, {args.size}px, batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"original notebooks' loop: {base_ips:.2f} img/s (per-image skimage: {base_data / args.steps:.3f} s/batch)")
    print(f"this stage's loop:        {our_ips:.2f} img/s")
    print(
        f"data loader alone: {t_loader * 1000:.1f} ms/batch = {t_loader / step_s * 100:.2f}% of a {step_s:.2f} s step"
    )
    print(f"RATIO train {our_ips / base_ips:.3f}")


if __name__ == "__main__":
    main()
