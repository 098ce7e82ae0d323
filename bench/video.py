"""Benchmark: flicker and accuracy of `colorize video`, per-frame vs stabilized, on real colour clips.

Each clip's colour original is the truth; the pipeline reads only its lightness (as it would a grayscale
film). For both modes: the warping error of Lai et al. (2018), mean |ab_t - warp(ab_{t-1})| over the
pixels the motion explains, with flow and occlusions from the original lightness, on the output frames'
ab at 256 px wide; and the per-frame RGB MSE against the original. Then frames/s of the whole command
(decode, network, stabilizer, encode) on a 480p clip. Needs a registered champion (``--workdir``) and
the clips of Debian's opencv-doc (``apt-get install opencv-doc``). Last line: ``RATIO flicker <per-frame
warping error / stabilized>``.

    .venv/bin/python bench/video.py --workdir work [--frames 60] [--clips vtest,tree,Megamind]
    .venv/bin/python bench/video.py --workdir work --device cuda   # the network on a GPU
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image
from skimage import color

from flows import arguments as arg
from flows.colorize_images import Running, load_net
from flows.colorize_video import VideoColorizer, frames
from model.inference import device_of
from model.temporal import Stabilizer, to_gray8, warping_error
from storage.errors import UserFacingError

CLIPS = Path("/usr/share/doc/opencv-doc/examples/data")


def small_lab(rgb: np.ndarray, width: int = 256) -> np.ndarray:
    h = round(rgb.shape[0] * width / rgb.shape[1])
    return color.rgb2lab(np.asarray(Image.fromarray(rgb).resize((width, h), Image.Resampling.BOX)))


def colorized(net, size: int, originals: list[np.ndarray], temporal: bool) -> list[np.ndarray]:
    """The frames through `colorize video`'s own pipeline, without the encoding."""
    video = VideoColorizer(net, size, temporal)
    stabilizer = Stabilizer() if temporal else None
    return [out for i in range(0, len(originals), 8) for out in video.colorize_frames(originals[i : i + 8], stabilizer)]


def measure(net, size: int, originals: list[np.ndarray], temporal: bool) -> dict[str, float]:
    outputs = colorized(net, size, originals, temporal)
    truth_lab = [small_lab(f) for f in originals]
    out_lab = [small_lab(f) for f in outputs]
    grays = [to_gray8(x[..., 0] / 100) for x in truth_lab]
    flicker = warping_error(grays, [np.ascontiguousarray(x[..., 1:].transpose(2, 0, 1)) for x in out_lab])
    pairs = zip(outputs, originals, strict=True)
    mse = np.mean([np.mean((o.astype(float) / 255 - t.astype(float) / 255) ** 2) for o, t in pairs])
    return {"warping_error": flicker, "rgb_mse": float(mse)}


def fps_480p(net, size: int, originals: list[np.ndarray]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.mp4"
        with av.open(str(src), "w") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 854, 480, "yuv420p"
            for rgb in originals:
                frame = av.VideoFrame.from_ndarray(np.asarray(Image.fromarray(rgb).resize((854, 480))), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        t0 = time.perf_counter()
        VideoColorizer(net, size, temporal=True).run(src, Path(tmp) / "out.mp4")
        return len(originals) / (time.perf_counter() - t0)


def strip(net, size: int, originals: list[np.ndarray], path: Path, every: int = 6, count: int = 6) -> None:
    """Rows: the original, per-frame, stabilized; columns: every ``every``-th frame."""
    picks = list(range(0, min(len(originals), every * count), every))
    rows = [[originals[i] for i in picks]]
    for temporal in (False, True):
        out = colorized(net, size, originals[: picks[-1] + 1], temporal)
        rows.append([out[i] for i in picks])
    h, w = originals[0].shape[:2]
    tile = (192, round(192 * h / w))
    grid = np.concatenate(
        [
            np.concatenate([np.asarray(Image.fromarray(f).resize(tile, Image.Resampling.BOX)) for f in r], 1)
            for r in rows
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def main(argv: list[str] | None = None) -> None:
    ap = arg.Parser(prog="bench/video.py")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model", help="models:/NAME@ALIAS or a trained stage folder (default: the champion)")
    ap.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--frames", type=arg.positive, default=60)
    ap.add_argument("--clips", default="vtest,tree,Megamind")
    ap.add_argument("--strip", help="write a strip (original | per-frame | stabilized) of the first clip here")
    args = ap.parse_args(argv)
    try:
        net, size = load_net(args.model, Path(args.workdir), Running(args.engine, args.device))
    except UserFacingError as exc:  # no work dir, no registered model, no such device: as the CLI says it
        arg.usage_error(str(exc))
    where = f"on {device_of(net)}"
    print(f"engine {type(net).__name__} {where}, network input {size} px, first {args.frames} frames of each clip")
    print(
        f"{'clip':<10} {'size':>9} {'warping error per-frame':>24} {'stabilized':>11} {'change':>8} "
        f"{'RGB MSE per-frame':>18} {'stabilized':>11} {'change':>8}"
    )
    ratios = []
    for name in args.clips.split(","):
        path = CLIPS / f"{name}.avi"
        if not path.is_file():
            print(f"{name:<10} missing: apt-get install opencv-doc")
            continue
        originals = [f for _, f in zip(range(args.frames), frames(path), strict=False)]
        a, b = measure(net, size, originals, False), measure(net, size, originals, True)
        ratios.append(a["warping_error"] / b["warping_error"])
        if args.strip and len(ratios) == 1:
            strip(net, size, originals, Path(args.strip))
        h, w = originals[0].shape[:2]
        print(
            f"{name:<10} {w:>4}x{h:<4} {a['warping_error']:>24.3f} {b['warping_error']:>11.3f} "
            f"{(b['warping_error'] / a['warping_error'] - 1) * 100:>+7.1f}% {a['rgb_mse']:>18.5f} "
            f"{b['rgb_mse']:>11.5f} {(b['rgb_mse'] / a['rgb_mse'] - 1) * 100:>+7.1f}%"
        )
    if ratios:
        print(f"frames/s at 480p (decode, network, stabilizer, encode): {fps_480p(net, size, originals):.1f}")
        print(f"RATIO flicker {min(ratios):.3f}")


if __name__ == "__main__":
    main()
