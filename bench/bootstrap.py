"""Benchmark: the study's two-level bootstrap, vectorized (model.study.bootstrap) vs the per-replicate
Python loop it replaced (fancy-indexed copies of the drawn seeds x images, one replicate at a time).

A comparison of the size the evaluate stage makes many of: 3 seeds per side, ``--images`` test images,
10,000 replicates. The two take turns over ``--rounds`` rounds; each round gives one ratio. Last line:
``RATIO bootstrap <median loop seconds / vectorized seconds>``.

    .venv/bin/python bench/bootstrap.py [--images 1000] [--rounds 5]
"""

from __future__ import annotations

import time

import numpy as np

from flows import arguments as arg
from model.study import bootstrap


def loop(ma: np.ndarray, mb: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The previous implementation, one replicate per iteration."""
    n = ma.shape[1]
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for i in range(n_boot):
        images = rng.integers(0, n, n)
        sa = rng.integers(0, ma.shape[0], ma.shape[0])
        sb = rng.integers(0, mb.shape[0], mb.shape[0])
        boot[i] = ma[np.ix_(sa, images)].mean() - mb[np.ix_(sb, images)].mean()
    return boot


def main(argv: list[str] | None = None) -> None:
    ap = arg.Parser(prog="bench/bootstrap.py")
    ap.add_argument("--images", type=arg.positive, default=1000)
    ap.add_argument("--rounds", type=arg.positive, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    ma, mb = rng.random((3, args.images)), rng.random((3, args.images))
    ratios = []
    for r in range(args.rounds):
        times, intervals = {}, {}
        for name in ("loop", "vectorized") if r % 2 == 0 else ("vectorized", "loop"):
            fn = loop if name == "loop" else bootstrap
            t0 = time.perf_counter()
            boot = fn(ma, mb, 10_000, 0)
            times[name] = time.perf_counter() - t0
            intervals[name] = "[{:+.4f}, {:+.4f}]".format(*np.percentile(boot, [2.5, 97.5]))
        ratios.append(times["loop"] / times["vectorized"])
        print(
            f"round {r + 1}: loop {times['loop']:.3f} s {intervals['loop']}, "
            f"vectorized {times['vectorized']:.3f} s {intervals['vectorized']} (95% intervals: other draws)"
        )
    print(f"RATIO bootstrap {float(np.median(ratios)):.3f}")


if __name__ == "__main__":
    main()
