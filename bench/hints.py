"""Benchmark: what the page does on a click (flows.app.recolour: read the photo, colorize it with the
points, write the PNG and the hints JSON), for a 512 px photo, on the torch and onnxruntime engines.

Uses the champion of ``--workdir`` (a model trained with hints; onnxruntime needs its ONNX export with
the hint inputs). Taking turns over ``--rounds`` rounds: a click with ``--points`` points and, as the
baseline in the same run, the automatic colorization through the same function (no point). Prints
each engine's median seconds per click. Last line: ``RATIO hints <median hinted / automatic, onnx>``.

    .venv/bin/python bench/hints.py --workdir work [--side 512] [--points 10] [--rounds 5]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from flows import arguments as arg
from storage.errors import ConfigError


def main() -> int:
    parser = arg.Parser(prog="bench/hints.py", description=__doc__)
    parser.add_argument("--workdir", required=True, help="the work dir whose champion takes hints")
    parser.add_argument("--side", type=arg.positive, default=512, help="the photo's longer side, px")
    parser.add_argument("--points", type=arg.positive, default=10, help="points per click")
    parser.add_argument("--rounds", type=arg.positive, default=5, help="paired rounds (taking turns)")
    args = parser.parse_args()

    from flows.app import hint_modes, recolour
    from flows.colorize_images import PhotoColorizer
    from model.loading import Running

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        side = args.side
        photo = out / "astronaut.png"
        Image.fromarray(data.astronaut()).convert("L").resize((side, side * 3 // 4)).save(photo)
        colours = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rng.integers(0, 256, (args.points, 3))]
        xy = rng.uniform(0, 1, (args.points, 2)) * (side, side * 3 // 4)
        points = [{"x": float(x), "y": float(y), "color": c} for (x, y), c in zip(xy, colours, strict=True)]
        ratios = {}
        for engine in ("torch", "onnx"):
            try:
                colorizer = PhotoColorizer.load(None, Path(args.workdir), Running(engine=engine), hinted=True)
            except ConfigError as exc:  # no model, or an export without hint inputs
                arg.usage_error(str(exc))
            if not hint_modes(colorizer)[0]:
                arg.usage_error(f"the champion of {args.workdir} was trained without hints")
            recolour(colorizer, str(photo), points, None, False, out)  # warm-up
            times: dict[str, list[float]] = {"automatic": [], "hinted": []}
            for _ in range(args.rounds):
                for kind, given in (("automatic", []), ("hinted", points)):
                    t0 = time.perf_counter()
                    picture, _, line = recolour(colorizer, str(photo), given, None, False, out)
                    times[kind].append(time.perf_counter() - t0)
                    assert picture is not None, line
            auto, hinted = (statistics.median(times[k]) for k in ("automatic", "hinted"))
            ratios[engine] = hinted / auto
            rounds = f"median of {args.rounds}"
            print(f"{engine}: a click with {args.points} points {hinted:.3f} s, automatic {auto:.3f} s ({rounds})")
    print(f"RATIO hints {ratios['onnx']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
