"""Pictures for people: sample grids (gray | prediction | truth) and loss curves, written as PNG."""

from __future__ import annotations

from pathlib import Path

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
