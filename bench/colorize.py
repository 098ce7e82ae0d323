"""Benchmark: `colorize image` cost vs photo size, and the full-resolution path vs the naive way.

For 512, 1024, 2048 and 4096 px photos (each size in its own process, so peak RSS is per size): seconds
and peak memory of model.inference.colorize. Then at 2048 px: this path (network at its own size, ab
upsampled, original L kept) vs running the network on the full-resolution L. Uses the champion with
``--workdir``, else an untrained network of the same shape (speed does not depend on the weights).
Last line: ``RATIO colorize <value>``.

With ``--engines 512,2048``: the two inference engines instead, PyTorch eager vs onnxruntime on the ONNX
export (the champion's with ``--workdir``, else a fresh export of the untrained network), the network
run at each side (``colorize image --size``), taking turns over ``--rounds`` paired rounds; and the
largest difference between the two engines' colorized photos, in 8-bit levels. Last line:
``RATIO onnx <median ratio at the smallest side>``.

    .venv/bin/python bench/colorize.py [--workdir work] [--sizes 512,1024,2048,4096] [--naive 2048]
    .venv/bin/python bench/colorize.py --engines 512,2048 [--rounds 3] [--workdir work]

With ``--device cuda``: the torch engine on that device vs on this CPU, batches of ``--batch`` photos of
1024 px at each network side in ``--net-sizes``, taking turns over ``--rounds``: photos/s of each and the
largest difference between their colorized photos in 8-bit levels (the promise is at most 1). Last line:
``RATIO device <device photos/s / CPU photos/s at the smallest side>``.

    python bench/colorize.py --device cuda [--net-sizes 224,512] [--batch 16] [--workdir work]
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from flows import arguments as arg


def load(workdir: str | None, size: int) -> torch.nn.Module:
    if workdir:
        from flows.colorize_images import load_net

        net, _ = load_net(None, Path(workdir))
        return net
    from model.colorizer import Colorizer, ColorizerSpec

    return Colorizer(ColorizerSpec(image_size=size)).eval()


def photo(side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(data.astronaut()).resize((side, side * 3 // 4), Image.Resampling.BICUBIC))


def one(side: int, mode: str, workdir: str | None, net_size: int) -> dict:
    from model.inference import colorize

    net = load(workdir, net_size)
    rgb = photo(side)
    colorize(net, photo(64), net_size)  # warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "ours":
        out = colorize(net, rgb, net_size)
    else:  # naive: the network at full resolution (sides rounded down to multiples of 32)
        h, w = (rgb.shape[0] // 32) * 32, (rgb.shape[1] // 32) * 32
        from model.inference import compose

        with torch.inference_mode():
            l_norm = torch.from_numpy(np.array(Image.fromarray(rgb[:h, :w]).convert("L"))).float()[None, None] / 255
            ab = net(l_norm)[0]
        out = compose(rgb[:h, :w], ab)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "side": side,
        "pixels": int(rgb.shape[0] * rgb.shape[1]),
        "seconds": seconds,
        "peak_mb": peak / 1024,
        "added_mb": (peak - base) / 1024,
        "out": list(out.shape),
    }


def engines(sides: list[int], rounds: int, workdir: str | None) -> None:
    import tempfile

    from model.inference import colorize
    from model.onnx_engine import OnnxColorizer, export

    if workdir:
        from flows.colorize_images import Running, load_net

        eager, _ = load_net(None, Path(workdir), Running("torch"))
        onnx, _ = load_net(None, Path(workdir), Running("onnx"))
    else:
        eager = load(None, 64)
        path = Path(tempfile.mkdtemp()) / "model.onnx"
        export(eager, path)
        onnx = OnnxColorizer(path, eager.spec)
    print(f"threads: torch {torch.get_num_threads()}; onnxruntime default (physical cores)")
    ratios = {}
    for side in sides:
        x = torch.rand(1, 1, side, side)
        with torch.inference_mode():
            eager(x), onnx(x)  # warm-up
            times = {"torch": [], "onnx": []}
            for r in range(rounds):
                for name in ("torch", "onnx") if r % 2 == 0 else ("onnx", "torch"):
                    net = eager if name == "torch" else onnx
                    t0 = time.perf_counter()
                    net(x)
                    times[name].append(time.perf_counter() - t0)
        per_round = [t / o for t, o in zip(times["torch"], times["onnx"], strict=True)]
        ratios[side] = float(np.median(per_round))
        rgb = photo(side)
        with torch.inference_mode():
            diff = np.abs(colorize(eager, rgb, side).astype(int) - colorize(onnx, rgb, side).astype(int)).max()
        print(
            f"{side:>5} px: torch {np.median(times['torch']):.3f} s, onnxruntime {np.median(times['onnx']):.3f} s "
            f"(medians of {rounds}); ratio {ratios[side]:.2f} (rounds {', '.join(f'{r:.2f}' for r in per_round)}); "
            f"max output difference {diff} / 255"
        )
    print(f"RATIO onnx {ratios[min(sides)]:.3f}")


def devices(device: str, sides: list[int], batch: int, rounds: int, workdir: str | None) -> None:
    """See the module docstring (``--device``)."""
    from model.inference import compose, predict, resolve_device

    target = resolve_device(device)
    photos = [photo(1024)] * batch
    ratios = {}
    for side in sides:
        net = load(workdir, side).cpu()
        nets = {"cpu": net, "device": copy.deepcopy(net).to(target)}  # the same weights on both
        outs, times = {}, {"cpu": [], "device": []}
        for r in range(rounds + 1):  # round 0: warm-up, not timed
            for name in ("cpu", "device") if r % 2 == 0 else ("device", "cpu"):
                t0 = time.perf_counter()
                _, ab = predict(nets[name], photos, side)
                outs[name] = [compose(p, a) for p, a in zip(photos, ab, strict=True)]
                if r:
                    times[name].append(time.perf_counter() - t0)
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(*outs.values(), strict=True))
        rate = {k: batch / float(np.median(v)) for k, v in times.items()}
        ratios[side] = rate["device"] / rate["cpu"]
        print(
            f"network side {side}: CPU {rate['cpu']:.2f} photos/s, {target} {rate['device']:.2f} photos/s "
            f"(batches of {batch} photos 1024x768, medians of {rounds}); max difference {diff}/255"
        )
    print(f"RATIO device {ratios[min(sides)]:.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = arg.Parser(prog="bench/colorize.py")
    ap.add_argument(
        "--engines",
        type=arg.comma_list(arg.side),
        help="compare torch and onnxruntime at these network sides, e.g. 512,2048",
    )
    ap.add_argument("--rounds", type=arg.positive, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--sizes", type=arg.comma_list(arg.positive), default="512,1024,2048,4096")
    ap.add_argument("--naive", type=arg.positive, default=2048)
    ap.add_argument("--net-size", type=arg.side, default=64)
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "MODE"))
    ap.add_argument("--device", help="compare the torch engine on this device with the CPU (see the docstring)")
    ap.add_argument("--net-sizes", type=arg.comma_list(arg.side), default="224,512")
    ap.add_argument("--batch", type=arg.positive, default=16)
    args = ap.parse_args(argv)
    if args.device:
        from model.inference import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as exc:
            arg.usage_error(str(exc))
        devices(args.device, args.net_sizes, args.batch, args.rounds, args.workdir)
        return
    if args.engines:
        engines(args.engines, args.rounds, args.workdir)
        return
    if args.child:
        print(json.dumps(one(int(args.child[0]), args.child[1], args.workdir, args.net_size)))
        return

    def run(side: int, mode: str) -> dict:
        cmd = [sys.executable, __file__, "--child", str(side), mode, "--net-size", str(args.net_size)]
        if args.workdir:
            cmd += ["--workdir", args.workdir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"{'side':>6} {'pixels':>10} {'seconds':>8} {'peak RSS MB':>12} {'added MB':>9}")
    rows = [run(s, "ours") for s in args.sizes]
    for r in rows:
        print(f"{r['side']:>6} {r['pixels']:>10,} {r['seconds']:>8.2f} {r['peak_mb']:>12.0f} {r['added_mb']:>9.0f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(
            f"cost growth {a['side']}->{b['side']} px: {b['pixels'] / a['pixels']:.0f}x pixels, "
            f"{b['seconds'] / a['seconds']:.1f}x time; memory added over the loaded model: "
            f"{a['added_mb']:.0f} MB -> {b['added_mb']:.0f} MB"
        )
    ours = next((r for r in rows if r["side"] == args.naive), None) or run(args.naive, "ours")
    naive = run(args.naive, "naive")
    print(
        f"{args.naive}px: network at its own size {ours['seconds']:.2f} s ({ours['added_mb']:.0f} MB added); "
        f"network at full resolution {naive['seconds']:.2f} s ({naive['added_mb']:.0f} MB added)"
    )
    print(f"RATIO colorize {naive['seconds'] / ours['seconds']:.3f}")


if __name__ == "__main__":
    main()
