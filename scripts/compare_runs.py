"""Compare one variant between two evaluated runs (a setting changed between them, e.g. the loss) with the
study's paired statistics: per-image differences on the same test images, two-level bootstrap interval
over images and seeds, Wilcoxon p beside it (model/study.py).

    .venv/bin/python scripts/compare_runs.py WORK/evaluate/<keyA> WORK/evaluate/<keyB> --variant max \
        [--labels mse mse+colourfulness] [--metrics rgb_mse colorfulness_gap colorfulness]

The two runs must have scored the same test images: their grayscale-baseline rows must agree image by
image, or the script refuses.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

from model.metrics import BASELINE
from model.study import aggregate, paired


def per_image(folder: Path, metric: str) -> dict[str, dict[int | None, list[float]]]:
    """{variant: {seed: values in image order}} from an evaluate folder's per_image.csv."""
    out: dict[str, dict[int | None, list[float]]] = defaultdict(dict)
    with open(folder / "per_image.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            model = row["model"]
            m = re.fullmatch(r"(.+)-seed(\d+)", model)
            variant, seed = (m.group(1), int(m.group(2))) if m else (model, None)
            out[variant].setdefault(seed, []).append(float(row[metric]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--labels", nargs=2, default=["A", "B"])
    ap.add_argument("--metrics", nargs="+", default=["rgb_mse", "ab_mse", "colorfulness_gap", "colorfulness"])
    args = ap.parse_args(argv)
    for folder in (args.a, args.b):
        if not (folder / "per_image.csv").is_file():
            print(f"error: {folder} has no per_image.csv (an evaluate stage folder is expected)", file=sys.stderr)
            return 2
    first = args.metrics[0]
    if per_image(args.a, first)[BASELINE] != per_image(args.b, first)[BASELINE]:
        print("error: the two runs scored different test images (their baselines differ)", file=sys.stderr)
        return 2
    la, lb = args.labels
    print(f"{args.variant}: {la} - {lb}, paired by test image")
    print("| metric | baseline | " + la + " | " + lb + " | difference | 95% interval | Wilcoxon p | significant |")
    print("|---|---|---|---|---|---|---|---|")
    for metric in args.metrics:
        a, b = per_image(args.a, metric), per_image(args.b, metric)
        if args.variant not in a or args.variant not in b:
            print(f"error: variant {args.variant!r} is not in both runs", file=sys.stderr)
            return 2
        base = aggregate(a[BASELINE], BASELINE, metric).mean
        ga, gb = aggregate(a[args.variant], la, metric), aggregate(b[args.variant], lb, metric)
        c = paired(a[args.variant], b[args.variant], (la, lb), metric)
        print(
            f"| {metric} | {base:.5g} | {ga.mean:.5g} ± {ga.std:.2g} | {gb.mean:.5g} ± {gb.std:.2g} "
            f"| {c.mean_diff:+.5g} | [{c.ci_low:+.4g}, {c.ci_high:+.4g}] | {c.p_wilcoxon:.3g} "
            f"| {'yes' if c.significant else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
