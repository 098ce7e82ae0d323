"""Benchmark: the upscale stage's path vs RealESRGANer.enhance one image at a time.

Same weights, same 32x32 images (real photo crops), same process. Baseline = the original notebooks'
way with the library's CPU defaults (tile=0, pre_pad=10, half=False). Measured: the stage's default
engine (``upscale.backend=auto``: ncnn on a CPU, batched PyTorch on a GPU) and, for comparison, the
batched PyTorch path. Prints throughput ratios, the max pixel difference of each against the baseline,
and GFLOP/s (direct-convolution count) against a conv peak measured in the same run: Winograd does fewer
multiplies than that count, which is how it gets past the peak. After one warm-up call each, the baseline
and the stage take turns over ``--rounds`` paired rounds on the same crops, the order flipping every round,
so that drift in a shared machine's speed falls on both sides alike; each round gives one ratio. Last line:
``RATIO upscale <value>``, the median of those per-round ratios (the stage's default engine vs the baseline).

    .venv/bin/python bench/upscale.py [--images 16] [--batch 8] [--rounds 5] [--bf16]

GPU mode, ``--device cuda``: the stage's PyTorch engine there, without RealESRGANer: img/s at each of
``--batches`` in float32 and bf16, and the largest pixel difference from this CPU's float32 output on
the same crops; ``--random-weights`` when no Real-ESRGAN weights are at hand (speed does not depend on
them; the difference then measures arithmetic only). Last line: ``RATIO upscale-device <GPU float32 at
the largest batch / CPU float32>``.

    python bench/upscale.py --device cuda --batches 64,256 --images 512

The baseline needs the ``bench`` extra (realesrgan and basicsr, last released 2022, whose setup imports
torch): ``pip install --no-build-isolation -e '.[bench]'``. The pipeline itself runs spandrel's RRDBNet.

``--write-reference PATH`` writes RealESRGANer's output on fixed crops (with the weights' sha256): the
reference tests/test_realesrgan.py holds both engines to without basicsr. It first checks that spandrel's
RRDBNet gives bitwise basicsr's float output on them, and exits 1 if not.

    python bench/upscale.py --write-reference tests/data/realesrgan_reference.npz
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from model.metrics import edge_f1
from model.realesrgan import (
    PRE_PAD,
    SCALE,
    WeightsInfo,
    load_upscaler,
    pad_input,
    resolve_weights,
    upscale,
)
from model.upscaler import make_upscaler
from storage.atomic import atomic_path


def realesrganer(info: WeightsInfo):  # noqa: ANN201 - RealESRGANer, from the optional bench extra
    """The reference: ``RealESRGANer`` with basicsr's own RRDBNet on ``info``'s weights (CPU defaults:
    tile 0, pre-pad 10, fp32). basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, gone
    since torchvision 0.17: a module with the one function it uses stands in for it."""
    name = "torchvision.transforms.functional_tensor"
    if name not in sys.modules and importlib.util.find_spec(name) is None:
        from torchvision.transforms import functional

        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].rgb_to_grayscale = functional.rgb_to_grayscale  # type: ignore[attr-defined]
    try:
        from basicsr.archs.rrdbnet_arch import RRDBNet
        from realesrgan import RealESRGANer
    except ImportError as exc:
        extra = "pip install --no-build-isolation -e '.[bench]'"
        raise SystemExit(f"error: the baseline needs {exc.name}: {extra}") from None
    net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=SCALE)
    return RealESRGANer(scale=SCALE, model_path=info.path, model=net, tile=0, pre_pad=PRE_PAD, half=False)


def write_reference(out: Path) -> None:
    """See the module docstring: two real 32x32 photo crops and one of noise, through RealESRGANer."""
    info = resolve_weights(allow_download=False)
    baseline = realesrganer(info)
    ours, _ = load_upscaler(info)
    images = np.stack(
        [
            data.astronaut()[100:132, 180:212],
            data.coffee()[150:182, 200:232],
            np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
        ]
    )
    x = pad_input(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.inference_mode():
        bitwise = torch.equal(ours(x), baseline.model(x))
    print(f"spandrel RRDBNet vs basicsr RRDBNet, float output on {tuple(x.shape)}: bitwise equal = {bitwise}")
    ref = np.stack([baseline.enhance(im[..., ::-1].copy(), outscale=SCALE)[0][..., ::-1] for im in images])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, inputs=images, reference=ref, weights_sha256=np.array(info.sha256))
    print(f"wrote {out}: RealESRGANer.enhance on {len(images)} images, weights {info.sha256[:16]} ({info.source})")
    if not bitwise:
        raise SystemExit(1)


def crops(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        side = int(rng.integers(64, 160))
        y, x = rng.integers(0, im.shape[0] - side), rng.integers(0, im.shape[1] - side)
        out.append(np.asarray(Image.fromarray(im[y : y + side, x : x + side]).resize((32, 32), Image.Resampling.BOX)))
    return np.stack(out)


def gradient_energy(rgb: np.ndarray) -> float:
    """Mean luminance gradient magnitude: how much edge structure an image carries."""
    y = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(y)
    return float(np.hypot(gx, gy).mean())


def quality(net: torch.nn.Module, out_png: str) -> None:
    """Real photo crops, box-downscaled 128 -> 32, upscaled back by bicubic and by Real-ESRGAN; writes a
    side-by-side PNG (input | bicubic | Real-ESRGAN | original) and prints SSIM and edge energy."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    hr = []
    for im in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket()) * 3:
        y, x = rng.integers(0, im.shape[0] - 128), rng.integers(0, im.shape[1] - 128)
        hr.append(im[y : y + 128, x : x + 128])
    lr = [np.asarray(Image.fromarray(h).resize((32, 32), Image.Resampling.BOX)) for h in hr]
    bic = [np.asarray(Image.fromarray(low).resize((128, 128), Image.Resampling.BICUBIC)) for low in lr]
    sr = upscale(net, torch.from_numpy(np.stack(lr)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    rows = [
        np.concatenate([np.asarray(Image.fromarray(low).resize((128, 128), Image.Resampling.NEAREST)), b, s, h], 1)
        for low, b, s, h in zip(lr, bic, sr, hr, strict=True)
    ]
    Image.fromarray(np.concatenate(rows, 0)).save(out_png)

    def ssim(a: np.ndarray, b: np.ndarray) -> float:
        return structural_similarity(a, b, channel_axis=-1, data_range=255)

    ssim_bic = np.mean([ssim(h, b) for h, b in zip(hr, bic, strict=True)])
    ssim_sr = np.mean([ssim(h, s) for h, s in zip(hr, sr, strict=True)])
    f1_bic = [edge_f1(b, h) for h, b in zip(hr, bic, strict=True)]
    f1_sr = [edge_f1(s, h) for h, s in zip(hr, sr, strict=True)]
    wins = sum(a > b for a, b in zip(f1_sr, f1_bic, strict=True))
    e_hr, e_bic, e_sr = (np.mean([gradient_energy(x) for x in group]) for group in (hr, bic, sr))
    print(
        f"quality, {len(hr)} real crops (128->32 box, x4 back): SSIM bicubic {ssim_bic:.4f}, Real-ESRGAN {ssim_sr:.4f}"
    )
    print(
        f"edge F1 vs the original (Canny sigma 1, 1 px tolerance): bicubic {np.mean(f1_bic):.3f}, "
        f"Real-ESRGAN {np.mean(f1_sr):.3f} (better on {wins}/{len(hr)} crops)"
    )
    print(f"edge energy: original {e_hr:.2f}, bicubic {e_bic:.2f}, Real-ESRGAN {e_sr:.2f}; side by side: {out_png}")


def conv_flops(net: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Multiply-adds x2 of every convolution for one forward pass of ``shape``."""
    total = 0.0

    def hook(mod: torch.nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total += 2.0 * mod.in_channels // mod.groups * k * out.numel()

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        net(torch.zeros(shape))
    for h in handles:
        h.remove()
    return total / shape[0]


def conv_peak(seconds: float = 3.0) -> float:
    """GFLOP/s of one large 3x3 convolution (64->64 channels, as in RRDBNet): this CPU's practical limit."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(8, 64, 96, 96).contiguous(memory_format=torch.channels_last)
    conv = conv.to(memory_format=torch.channels_last)
    flops = 2.0 * 64 * 64 * 9 * 8 * 96 * 96
    with torch.inference_mode():
        conv(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            conv(x)
            n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def run_rounds(
    sides: dict[str, Callable[[], tuple[float, np.ndarray]]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """``rounds`` paired rounds, each timing every side once on the same crops, in the given order on even
    rounds and reversed on odd ones, so that drift in a shared machine's speed falls on both sides alike
    instead of on whichever ran second. Seconds per side per round, and each side's first-round output."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    outs: dict[str, np.ndarray] = {}
    names = list(sides)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t, out = sides[name]()
            seconds[name].append(t)
            outs.setdefault(name, out)
        ratio = seconds[names[0]][-1] / seconds[names[1]][-1]
        times = ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in order)
        print(f"round {r + 1}/{rounds}: {times}; ratio {ratio:.3f}", flush=True)
    return seconds, outs


def device_mode(args: argparse.Namespace) -> None:
    """See the module docstring (GPU mode)."""
    from model.realesrgan import rrdbnet

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    net = rrdbnet().eval() if args.random_weights else load_upscaler(resolve_weights())[0]
    batches = [int(b) for b in args.batches.split(",")]
    images = torch.from_numpy(crops(max(args.images, *batches))).permute(0, 3, 1, 2).contiguous()
    probe = images[:16]
    t0 = time.perf_counter()
    ref = upscale(net, probe)
    cpu_ips = len(probe) / (time.perf_counter() - t0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    weights = "random" if args.random_weights else "Real-ESRGAN x4plus"
    print(f"{where}; weights {weights}; CPU float32 {cpu_ips:.1f} img/s")
    net = net.to(device)
    rates = {}
    for bf16 in (False, True):
        diff = int((upscale(net, probe.to(device), bf16=bf16).cpu().int() - ref.int()).abs().max())
        for batch in batches:
            chunks = [images[i : i + batch].to(device) for i in range(0, len(images) - batch + 1, batch)]
            upscale(net, chunks[0], bf16=bf16)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                for c in chunks:
                    upscale(net, c, bf16=bf16)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[(bf16, batch)] = args.rounds * batch * len(chunks) / (time.perf_counter() - t0)
            kind = "bf16" if bf16 else "float32"
            rate = rates[(bf16, batch)]
            print(f"{kind:>7} batch {batch:>4}: {rate:>8.1f} img/s; max difference from the CPU {diff}/255")
    print(f"RATIO upscale-device {rates[(False, max(batches))] / cpu_ips:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=at_least_one, default=5, help="paired baseline/stage timing rounds (>= 1)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--png", default="bench/out/upscale_side_by_side.png")
    ap.add_argument("--device", help="GPU mode: the stage's torch engine on this device (see the docstring)")
    ap.add_argument("--batches", default="64,256", help="GPU mode: batch sizes")
    ap.add_argument("--random-weights", action="store_true", help="GPU mode: an untrained RRDBNet")
    ap.add_argument("--write-reference", type=Path, metavar="PATH", help="write the tests' reference and exit")
    args = ap.parse_args()
    if args.write_reference:
        write_reference(args.write_reference)
        return
    if args.device:
        device_mode(args)
        return
    info = resolve_weights()
    baseline = realesrganer(info)
    net, _ = load_upscaler(info)
    images = crops(args.images)
    print(f"weights: {info.source} ({info.note or info.path}); threads: {torch.get_num_threads()}")

    x = torch.from_numpy(images).permute(0, 3, 1, 2)

    def timed_baseline() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        ref = [baseline.enhance(img[..., ::-1].copy(), outscale=SCALE)[0][..., ::-1] for img in images]
        return time.perf_counter() - t0, np.stack(ref)

    def timed(fn) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        outs = [fn(x[i : i + args.batch]) for i in range(0, len(x), args.batch)]
        return time.perf_counter() - t0, torch.cat(outs).permute(0, 2, 3, 1).numpy()

    stage = make_upscaler(info, "auto", bf16=args.bf16)
    baseline.enhance(images[0][..., ::-1].copy(), outscale=SCALE)  # warm-up
    stage(x[: args.batch])  # warm-up
    seconds, outs = run_rounds({"baseline": timed_baseline, "stage": lambda: timed(stage)}, args.rounds)
    ref, out_stage = outs["baseline"], outs["stage"]
    ratios = [b / s for b, s in zip(seconds["baseline"], seconds["stage"], strict=True)]
    ratio = float(np.median(ratios))
    t_base, t_stage = float(np.median(seconds["baseline"])), float(np.median(seconds["stage"]))

    def torch_batched(b: torch.Tensor) -> torch.Tensor:
        return upscale(net, b, bf16=args.bf16)

    torch_batched(x[: args.batch])  # warm-up
    t_torch, out_torch = timed(torch_batched)

    gflop = conv_flops(net.float().to(memory_format=torch.contiguous_format), (1, 3, 32 + PRE_PAD, 32 + PRE_PAD)) / 1e9
    peak = conv_peak()
    n = len(images)
    print(
        f"baseline RealESRGANer.enhance, 1 image/call: {n / t_base:.3f} img/s ({t_base / n:.3f} s/img; "
        f"median of {args.rounds} round{'s' if args.rounds > 1 else ''})"
    )
    print(f"RRDBNet: {gflop:.1f} GFLOP (direct convolution) per padded 32x32 image; conv peak now {peak:.1f} GFLOP/s")
    label = f"batch {args.batch}{' bf16' if args.bf16 else ''}"
    for name, t, x_base, out in (
        (f"stage default ({stage.backend}), {label}, median of paired rounds", t_stage, ratio, out_stage),
        (f"torch batched, {label}, one run vs the median baseline", t_torch, t_base / t_torch, out_torch),
    ):
        diff = np.abs(out.astype(int) - ref.astype(int))
        print(
            f"{name}: {n / t:.3f} img/s ({t / n:.3f} s/img), x{x_base:.2f} vs baseline; max pixel difference "
            f"{diff.max()} / 255 ({(diff > 0).mean() * 100:.3f}% differ); {gflop * n / t:.1f} GFLOP/s "
            f"= {gflop * n / t / peak * 100:.0f}% of the direct-conv peak"
        )
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    quality(net, args.png)
    q1, q3 = np.percentile(ratios, [25, 75])
    print(f"per-round ratios (baseline s / stage s): {', '.join(f'{r:.3f}' for r in ratios)}")
    print(
        f"median ratio {ratio:.3f} over {len(ratios)} paired rounds; min-max {min(ratios):.3f}-{max(ratios):.3f}, "
        f"IQR {q1:.3f}-{q3:.3f}"
    )
    print(f"RATIO upscale {ratio:.3f}")


if __name__ == "__main__":
    main()
