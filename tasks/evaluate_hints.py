"""The evaluate stage's hint curve: what hints do to a model trained to take them.

Each hinted model (``train.hints`` other than ``off``) is scored again on the same test split given 1, 2,
5, 10, 20, 50 points from the truth (``evaluate.hint_points``: 6 x 6 px patches at 256 px of the truth's
mean ab, the positions of Zhang et al.'s simulated user; image i's points seeded by
(``evaluate.hint_seed``, i), so every model, run and batch size sees the same ones), and, for a model
that takes a reference, with the truth's own global hint and no point. 0 points is the model's automatic
output, the row the main table already has. Every condition is compared with 0 points, paired by image,
by the study's two-level bootstrap (model.study.paired): the interval says whether the points helped.

What it finds is a value (:class:`HintCurve`): the table (hints.csv, hints.md, the manifest), each
model's ``test_<metric>_hints_<n>`` for its MLflow run, and the pictures (hints.png, the curve;
hints_grid.png, test images grey | automatic | 5 points | 10 points | the global hint | truth).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.hints import GLOBAL, curve_inputs
from model.metrics import HIGHER_IS_BETTER, METRICS
from model.study import paired
from storage.atomic import write_bytes

GRID_POINTS = (5, 10)  # hints_grid.png's columns of points
CURVE_METRICS = ("rgb_mse", "psnr", "ssim", "lpips", "colorfulness_gap")  # the issue's and Zhang'17's measures
PLOTTED = ("psnr", "rgb_mse", "colorfulness_gap")
Condition = int | str  # a number of points, or model.hints.GLOBAL


def takes_hints(trained: Mapping[str, Any]) -> bool:
    """Whether a train manifest's model takes hints (a manifest without a spec: assume so, to be safe)."""
    spec = trained.get("spec")
    return spec is None or spec.get("hints", "off") != "off"


def conditions(points: Sequence[int], mode: str) -> list[Condition]:
    """The curve's conditions for a model trained with ``train.hints=mode``: the numbers of points, then
    the truth's global hint when the model takes one."""
    return [*points, *([GLOBAL] if mode == "local+global" else [])]


def score_conditions(
    net: Any,
    automatic: Any,
    score: Any,
    points: Sequence[int],
    seed: int,
) -> dict[Condition, Any]:
    """Each condition's scores (model.evaluate.Scored) for one hinted ``net``; ``automatic`` (its
    unhinted scores) is the 0-point row, ``score(net, hints)`` scores it with those hint inputs."""
    out: dict[Condition, Any] = {}
    for c in conditions(points, net.spec.hints):
        if c == 0:
            out[c] = automatic
        else:
            out[c] = score(net, lambda ab, first, c=c: curve_inputs(ab, c, seed, first))
    return out


def label(condition: Condition) -> str:
    """How a condition reads in a metric name and a table: ``10`` or ``global``."""
    return str(condition)


@dataclass(frozen=True)
class HintCurve:
    """The hint curve, as plain values: one row per (variant, condition), its metrics' means over the
    variant's seeds and each one's paired difference from 0 points with its 95% interval; each model's
    means (for its MLflow run); why LPIPS is missing, if it is."""

    rows: list[dict[str, Any]]
    per_model: dict[tuple[str, int], dict[str, dict[str, float]]]
    lpips_missing: str | None

    def test_metrics(self) -> list[tuple[tuple[str, int], dict[str, float]]]:
        """((variant, seed), ``test_<metric>_hints_<condition>`` of every finite metric)."""
        out = []
        for model, by_cond in self.per_model.items():
            named = {f"test_{m}_hints_{c}": v for c, means in by_cond.items() for m, v in means.items()}
            out.append((model, {k: v for k, v in named.items() if math.isfinite(v)}))
        return out

    def markdown(self) -> str:
        metrics = [m for m in CURVE_METRICS if any(math.isfinite(r[m]) for r in self.rows)]
        head = ["variant", "hints", "seeds", *(METRICS[m].header for m in metrics)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r["variant"], _condition_text(r["condition"]), str(r["n_seeds"])]
            for m in metrics:
                cell = METRICS[m].cell(r[m])
                if f"{m}_diff" in r:
                    cell += f" ({r[f'{m}_diff']:+.4g} [{r[f'{m}_low']:+.4g}, {r[f'{m}_high']:+.4g}])"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Hints from the truth: n points (6 x 6 px patches at 256 px, the truth's mean ab over each; the same "
            "points for every model), or the truth's own global hint and no point. In brackets: the difference "
            "from the same model's automatic output (0 points), paired by test image, with its 95% interval "
            "(two-level bootstrap over images and seeds).",
        ]
        if self.lpips_missing:
            lines.append(f"LPIPS missing: {self.lpips_missing}")
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        """hints.csv and hints.md into ``out``."""
        import pandas as pd

        write_bytes(out / "hints.csv", pd.DataFrame(self.rows).to_csv(index=False).encode())
        write_bytes(out / "hints.md", self.markdown().encode())


def _condition_text(condition: str) -> str:
    if condition == GLOBAL:
        return "global (the truth's)"
    return "none (automatic)" if condition == "0" else f"{condition} point{'s' if condition != '1' else ''}"


def hint_curve(scores: Mapping[tuple[str, int], Mapping[Condition, Any]], lpips_missing: str | None) -> HintCurve:
    """The curve from each hinted model's condition scores (``scores[(variant, seed)][condition]``)."""
    per_model = {
        model: {label(c): {m: float(s.means[m]) for m in CURVE_METRICS} for c, s in by_cond.items()}
        for model, by_cond in sorted(scores.items())
    }
    rows = []
    for variant in dict.fromkeys(v for v, _ in sorted(scores)):
        seeds = {seed: scores[(v, seed)] for v, seed in sorted(scores) if v == variant}
        for c in next(iter(seeds.values())):
            row: dict[str, Any] = {"variant": variant, "condition": label(c), "n_seeds": len(seeds)}
            for m in CURVE_METRICS:
                per_seed = {seed: by_cond[c].column(m) for seed, by_cond in seeds.items()}
                row[m] = float(sum(by_cond[c].means[m] for by_cond in seeds.values()) / len(seeds))
                if c == 0 or not all(math.isfinite(x) for v in per_seed.values() for x in v):
                    continue
                zero = {seed: by_cond[0].column(m) for seed, by_cond in seeds.items()}
                comp = paired(per_seed, zero, (label(c), "0"), m)
                row.update({f"{m}_diff": comp.mean_diff, f"{m}_low": comp.ci_low, f"{m}_high": comp.ci_high})
                row[f"{m}_better"] = comp.significant and (comp.mean_diff > 0) == HIGHER_IS_BETTER[m]
            rows.append(row)
    return HintCurve(rows, per_model, lpips_missing)


def save_plot(curve: HintCurve, baseline: Mapping[str, float], path: Path) -> Path:
    """hints.png: per plotted metric, each variant's mean against the number of points (0 to 50, and the
    global hint at the right), each point's bar the 95% interval of its difference from 0 points placed
    on the 0-point mean; the grey image's score dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from storage.atomic import atomic_path

    labels = list(dict.fromkeys(r["condition"] for r in curve.rows))
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 3.8), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], PLOTTED, strict=True):
        for variant in dict.fromkeys(r["variant"] for r in curve.rows):
            rows = [r for r in curve.rows if r["variant"] == variant]
            zero = next(r[m] for r in rows if r["condition"] == "0")
            x = [labels.index(r["condition"]) for r in rows]
            y = [r[m] for r in rows]
            low = [r[m] - (zero + r[f"{m}_low"]) if f"{m}_low" in r else 0.0 for r in rows]
            high = [(zero + r[f"{m}_high"]) - r[m] if f"{m}_high" in r else 0.0 for r in rows]
            ax.errorbar(x, y, yerr=[low, high], fmt="o-", capsize=4, label=variant)
        if m in baseline and math.isfinite(baseline[m]):
            ax.axhline(baseline[m], ls="--", color="k", lw=1, label="grey")
        ax.set_xticks(range(len(labels)), ["ref" if c == GLOBAL else c for c in labels])
        ax.set_xlabel("points from the truth")
        ax.set_title(f"{METRICS[m].header} ({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def save_grid(net: Any, l_norm: Any, ab: Any, seed: int, path: Path) -> Path:
    """hints_grid.png for one hinted model on a batch of test images (``l_norm``, true ``ab``): grey,
    automatic, :data:`GRID_POINTS` points from the truth (the curve's own points), the truth's global hint
    (a model that takes one), truth."""
    import torch

    from model.inference import device_of
    from model.preview import grid, save_png

    device = device_of(net)
    l_dev, ab_dev = l_norm.to(device), ab.to(device)
    given = [{}, *({"c": n} for n in GRID_POINTS)] + ([{"c": GLOBAL}] if net.spec.hints == "local+global" else [])
    with torch.no_grad():
        cols = [net(l_dev, **(curve_inputs(ab_dev, g["c"], seed, 0) if g else {})).float().cpu() for g in given]
    return save_png(grid(l_norm, [*cols, ab]), path)
