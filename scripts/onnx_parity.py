"""How far onnxruntime and eager PyTorch differ on this CPU: the measurement behind the ONNX export
check's tolerances (model/onnx_engine.py).

Exports networks of the demo preset's shape (decoder width 64, input 64 px) with random weights, one per
fusion and seed, plus every trained stage folder under ``--workdir`` (the demo's three variants after
``make demo``), and runs the export check's own comparison (the same photos and shapes) on each. Prints
one row per network and shape (max |ab| difference, normalized; max RGB difference in 8-bit levels) and
the distribution over all of them; and, for comparison, the ab difference on uniform-noise L (the input
the check used before it compared photos).

    .venv/bin/python scripts/onnx_parity.py [--seeds 0,1,2] [--workdir work]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from model.colorizer import Colorizer, ColorizerSpec, is_trained_folder, load_folder
from model.onnx_engine import (
    AB_TOLERANCE,
    RGB_TOLERANCE,
    OnnxColorizer,
    check_photos,
    check_shapes,
    compare,
    write_onnx,
)


def _export(net: Colorizer, path: Path) -> OnnxColorizer:
    """Export without the check (this script measures what the check would see)."""
    write_onnx(net, path)
    return OnnxColorizer(path, net.spec)


def _networks(seeds: list[int], workdir: str | None) -> list[tuple[str, Colorizer]]:
    nets = []
    for fusion in ("concat", "average", "max"):
        for seed in seeds:
            torch.manual_seed(seed)
            nets.append((f"random {fusion} seed {seed}", Colorizer(ColorizerSpec(fusion=fusion)).eval()))
    if workdir:
        for folder in sorted(Path(workdir, "train").glob("*/")):
            if is_trained_folder(folder):
                nets.append((f"trained {folder.name}", load_folder(folder)))
    return nets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workdir", help="also measure the trained stage folders under WORKDIR/train")
    args = ap.parse_args()
    ab_all, rgb_all, noise_all = [], [], []
    flags = (
        Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0]
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    print(f"cpu: {isa}{' (bf16)' if 'avx512_bf16' in flags else ''}; torch {torch.__version__}")
    print("| network | shape | max ab diff (normalized) | max RGB diff (levels) | ab diff on noise L |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in _networks([int(s) for s in args.seeds.split(",")], args.workdir):
            engine = _export(net.to(memory_format=torch.contiguous_format), Path(tmp) / "m.onnx")
            for i, (b, h, w) in enumerate(check_shapes(net.spec.image_size)):
                ab, rgb = compare(engine, net, check_photos(b, h, w, seed=i))
                noise = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(i))
                with torch.no_grad():
                    noise_diff = float((engine(noise) - net(noise)).abs().max())
                ab_all.append(ab)
                rgb_all.append(rgb)
                noise_all.append(noise_diff)
                print(f"| {name} | {b}x{h}x{w} | {ab:.2e} | {rgb} | {noise_diff:.2e} |")
    q = np.quantile(ab_all, [0.0, 0.5, 0.9, 1.0])
    print(
        f"\n{len(ab_all)} comparisons. max ab diff: min {q[0]:.2e}, median {q[1]:.2e}, p90 {q[2]:.2e}, "
        f"max {q[3]:.2e} (tolerance {AB_TOLERANCE:g}: {AB_TOLERANCE / q[3]:.0f}x the largest seen). "
        f"max RGB diff: {dict(zip(*np.unique(rgb_all, return_counts=True), strict=True))} levels -> count "
        f"(tolerance {RGB_TOLERANCE}). On noise L: max ab diff {max(noise_all):.2e}."
    )


if __name__ == "__main__":
    main()
