"""Compare one variant across evaluated runs (a setting changed between them: the loss, the head, the
decoding temperature) with the study's paired statistics: per-image differences on the same test
images, two-level bootstrap interval over images and seeds, Wilcoxon p beside it (model/study.py).

    .venv/bin/python scripts/compare_runs.py WORK/evaluate/<keyA> WORK/evaluate/<keyB> [more runs] \
        --variant max [--labels mse classification] [--metrics rgb_mse colorfulness_gap ab_hist] \
        [--grid grid.png --grid-images 8 --grid-stride 8]

Prints each run's mean +- std over seeds beside the grayscale baseline, then every later run against the
first and every run against the baseline, on the metrics model.metrics' table marks as compared by
default (those every run has a number for), or on ``--metrics`` (any column of the table). The arguments
are checked before any work: an unknown metric, one a run has no number for (LPIPS where its backbone
was missing), or a grid of no images is refused in one line on stderr (exit 2).
``--grid`` draws gray | each run's lowest seed | truth on the first test images, each run decoded as it
was evaluated (a classification head at its run's temperature). The runs must have scored the same test
images: their grayscale-baseline rows must agree image by image, or the script refuses.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from model.metrics import BASELINE, COLUMNS, COMPARED, METRICS
from model.study import Comparison, aggregate, paired


def per_image(folder: Path, metric: str) -> dict[str, dict[int | None, list[float]]]:
    """{variant: {seed: values in image order}} from an evaluate folder's per_image.csv (an empty cell, a
    missing LPIPS, is NaN)."""
    out: dict[str, dict[int | None, list[float]]] = defaultdict(dict)
    with open(folder / "per_image.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            model = row["model"]
            m = re.fullmatch(r"(.+)-seed(\d+)", model)
            variant, seed = (m.group(1), int(m.group(2))) if m else (model, None)
            out[variant].setdefault(seed, []).append(float(row[metric] or "nan"))
    return out


def scored(run: Path, metric: str) -> bool:
    """Whether ``run`` has a number for ``metric`` on every test image of every model (LPIPS is NaN where
    its backbone was missing, every metric of a diverged model too)."""
    return all(math.isfinite(x) for seeds in per_image(run, metric).values() for v in seeds.values() for x in v)


def scored_everywhere(runs: list[Path], metrics: tuple[str, ...] = COMPARED) -> list[str]:
    """The ``metrics`` every run has a number for on every test image."""
    return [m for m in metrics if all(scored(run, m) for run in runs)]


def argument_problem(args: argparse.Namespace, labels: list[str]) -> str | None:
    """What is wrong with the arguments, in one line, or None: checked before any work."""
    if len(args.runs) < 2 or len(labels) != len(args.runs):
        return "give at least two runs and one label per run"
    unknown = [m for m in args.metrics or [] if m not in METRICS]
    if unknown:
        return f"--metrics: unknown metric {unknown[0]!r}; choose from {', '.join(COLUMNS)}"
    for name in ("grid_images", "grid_stride"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    for folder in args.runs:
        if not (folder / "per_image.csv").is_file():
            return f"{folder} has no per_image.csv (an evaluate stage folder is expected)"
    for m in args.metrics or []:
        missing = [str(run) for run in args.runs if not scored(run, m)]
        if missing:
            why = " (its backbone was missing there)" if m == "lpips" else ""
            return f"--metrics: {m} has no number for every test image of {missing[0]}{why}"
    return None


def _row(c: Comparison) -> str:
    return (
        f"| {c.a} - {c.b} | {METRICS[c.metric].header} | {c.mean_diff:+.5g} | [{c.ci_low:+.4g}, {c.ci_high:+.4g}] "
        f"| {c.p_wilcoxon:.3g} | {'yes' if c.significant else 'no'} |"
    )


def draw_grid(runs: list[Path], variant: str, dest: Path, images: int, stride: int = 1) -> None:
    """gray | each run's lowest-seed model of ``variant`` | truth, on the first test images (every
    ``stride``-th: a photo's crops are consecutive, so a stride of crops per photo shows other photos)."""
    import torch

    from model.colorizer import load_folder
    from model.inference import Vivid
    from model.preview import grid, save_png
    from model.samples import first_batch
    from storage.shards import shard_paths
    from storage.stage import load_manifest

    def inputs(run: Path, name: str) -> list[dict]:
        """An evaluate stage's input manifests (its manifest holds references: stage and key)."""
        refs = json.loads((run / "manifest.json").read_text())["inputs"][name]
        workdir = run.parent.parent
        return [
            load_manifest(workdir / ref["stage"] / ref["key"]) for ref in (refs if isinstance(refs, list) else [refs])
        ]

    l_norm, ab = first_batch(shard_paths(inputs(runs[0], "prepared")[0], "test"), images * stride)
    l_norm, ab = l_norm[::stride], ab[::stride]
    cols = []
    for run in runs:
        trained = min((t for t in inputs(run, "trained") if t["variant"] == variant), key=lambda t: t["seed"])
        net = load_folder(trained["folder"])
        if net.classifies:  # decoded as its run evaluated it
            net = Vivid(net, json.loads((run / "manifest.json").read_text())["config"]["temperature"])
        with torch.no_grad():
            cols.append(net(l_norm).float())
    save_png(grid(l_norm, [*cols, ab]), dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="evaluate stage folders; the first is the reference")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--labels", nargs="+", default=None, help="one per run (default A, B, C...)")
    ap.add_argument(
        "--metrics", nargs="+", default=None, help=f"of {', '.join(COLUMNS)}; default: {' '.join(COMPARED)}"
    )
    ap.add_argument("--grid", type=Path, default=None, help="also draw the runs' pictures side by side here")
    ap.add_argument("--grid-images", type=int, default=8)
    ap.add_argument("--grid-stride", type=int, default=1, help="every Nth test image (N = crops per photo)")
    args = ap.parse_args(argv)
    labels = args.labels or [chr(ord("A") + i) for i in range(len(args.runs))]
    problem = argument_problem(args, labels)
    if problem is None:
        args.metrics = args.metrics or scored_everywhere(args.runs)
        if not args.metrics:
            problem = "no compared metric has a number for every test image of every run; name some with --metrics"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    first = args.metrics[0]
    if any(per_image(run, first)[BASELINE] != per_image(args.runs[0], first)[BASELINE] for run in args.runs[1:]):
        print("error: the runs scored different test images (their baselines differ)", file=sys.stderr)
        return 2
    data = {m: [per_image(run, m) for run in args.runs] for m in args.metrics}
    if any(args.variant not in d for runs in data.values() for d in runs):
        print(f"error: variant {args.variant!r} is not in every run", file=sys.stderr)
        return 2

    print(f"{args.variant}, mean ± std over seeds; grayscale baseline first")
    print("| model | " + " | ".join(METRICS[m].header for m in args.metrics) + " |")
    print("|---|" + "---|" * len(args.metrics))
    base = [aggregate(data[m][0][BASELINE], BASELINE, m).mean for m in args.metrics]
    print(f"| {BASELINE} | " + " | ".join(f"{v:.5g}" for v in base) + " |")
    for i, label in enumerate(labels):
        cells = [aggregate(data[m][i][args.variant], label, m) for m in args.metrics]
        print(f"| {label} | " + " | ".join(f"{g.mean:.5g} ± {g.std:.2g}" for g in cells) + " |")
    print("\nPaired by test image (two-level bootstrap over images and seeds, 95%)")
    print("| A - B | metric | difference | 95% interval | Wilcoxon p | significant |")
    print("|---|---|---|---|---|---|")
    for m in args.metrics:
        ref = data[m][0][args.variant]
        for i, label in enumerate(labels[1:], start=1):
            print(_row(paired(data[m][i][args.variant], ref, (label, labels[0]), m)))
        for i, label in enumerate(labels):
            print(_row(paired(data[m][i][args.variant], data[m][i][BASELINE], (label, "grey"), m)))
    if args.grid is not None:
        draw_grid(args.runs, args.variant, args.grid, args.grid_images, args.grid_stride)
        print(f"\ngrid: {args.grid} (gray | {' | '.join(labels)} | truth)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
