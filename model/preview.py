"""Pictures for people: sample grids (gray | prediction | truth) and loss curves, written as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.lab import lab_norm_to_rgb
from storage.atomic import atomic_path


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [0,1] -> (B,H,W,3) uint8."""
    return (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(l_norm: torch.Tensor, columns: list[torch.Tensor], scale: int = 2) -> np.ndarray:
    """One row per image: grey L, then each ab in ``columns`` rebuilt with the true L."""
    gray = to_uint8(lab_norm_to_rgb(l_norm, torch.zeros_like(columns[0])))
    panels = [gray] + [to_uint8(lab_norm_to_rgb(l_norm, ab)) for ab in columns]
    rows = [np.concatenate([p[i] for p in panels], axis=1) for i in range(l_norm.shape[0])]
    img = np.concatenate(rows, axis=0)
    return img.repeat(scale, 0).repeat(scale, 1) if scale > 1 else img


def save_png(img: np.ndarray, path: Path) -> Path:
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return path


def save_loss_curve(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train MSE (ab)", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation MSE (ab)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def save_study_plot(
    variants: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    diffs: dict[tuple[str, str, str], list[float]],
    metrics: tuple[str, ...],
    path: Path,
) -> Path:
    """One row per metric. Left: each variant's mean over seeds with a +-1 std bar, each seed's score as
    a dot, the baseline as a dashed line. Right: every paired comparison's per-image differences (dots),
    the mean difference and its 95% interval (bar); zero marked, so an interval across it reads at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.6 * len(metrics)), dpi=100, squeeze=False)
    for (left, right), metric in zip(axes, metrics, strict=True):
        base, rows = variants[0], variants[1:]
        x = np.arange(len(rows))
        left.errorbar(x, [r[metric] for r in rows], yerr=[r[f"{metric}_std"] for r in rows], fmt="o", capsize=6, ms=8)
        for i, r in enumerate(rows):
            seeds = r.get("per_seed", {}).get(metric, [])
            left.plot([i + 0.12] * len(seeds), seeds, ".", color="grey")
        left.axhline(base[metric], ls="--", color="k", lw=1, label=base["variant"])
        left.set_xticks(x, [f"{r['variant']}\n({r['n_seeds']} seeds)" for r in rows])
        left.set_ylabel(metric)
        left.set_title(f"{metric}: mean ± std over seeds")
        left.legend(fontsize=8)
        pairs = [c for c in comparisons if c["metric"] == metric]
        for j, c in enumerate(pairs):
            d = diffs.get((metric, c["a"], c["b"]), [])
            jitter = np.random.default_rng(j).uniform(-0.15, 0.15, len(d))
            right.plot(j + jitter, d, ".", alpha=0.35, color="grey")
            colour = "tab:red" if c["significant"] else "tab:blue"
            right.errorbar(
                [j],
                [c["mean_diff"]],
                yerr=[[c["mean_diff"] - c["ci_low"]], [c["ci_high"] - c["mean_diff"]]],
                fmt="s",
                capsize=6,
                color=colour,
            )
        right.axhline(0, color="k", lw=1)
        right.set_xticks(range(len(pairs)), [f"{c['a']}\n- {c['b']}" for c in pairs], fontsize=8)
        right.set_title(f"{metric}: paired A - B, mean and 95% interval (red: significant)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
