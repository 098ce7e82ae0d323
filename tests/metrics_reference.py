"""The per-image numpy definitions of the evaluation table's metrics: the reference the batched torch
path (model.metrics.batch_metrics, what the evaluate stage runs) is pinned to by
tests/test_evaluate.py, written as directly as the conventions in model/metrics.py's docstring read.
Not a test module: imported by the tests that need it (LPIPS has no numpy definition; it is a network)."""

from __future__ import annotations

import numpy as np

from model.ab_bins import GRID as AB_CELL
from model.lab import AB_SCALE as AB_UNITS
from model.metrics import AB_CELLS, colorfulness, ssim


def psnr(true_rgb: np.ndarray, pred_rgb: np.ndarray, rgb_mse: float) -> float:
    """scikit-image's PSNR; +inf only for an exact match, NaN (ranked worst) for a non-finite prediction."""
    from skimage.metrics import peak_signal_noise_ratio

    if not np.isfinite(rgb_mse):
        return float("nan")
    return float(peak_signal_noise_ratio(true_rgb, pred_rgb, data_range=1.0)) if rgb_mse > 0 else float("inf")


def ab_hist(true_ab: np.ndarray, pred_ab: np.ndarray) -> float:
    """model.metrics.ab_hist_torch for one image in numpy, ab ``(2, H, W)``."""
    if np.isnan(pred_ab).any():
        return float("nan")
    half = AB_CELLS // 2

    def hist(ab: np.ndarray) -> np.ndarray:
        c = np.clip(np.round(ab * AB_UNITS / AB_CELL), -half, half).astype(np.int64) + half
        return np.bincount((c[0] * AB_CELLS + c[1]).ravel(), minlength=AB_CELLS * AB_CELLS)

    return float(np.minimum(hist(true_ab), hist(pred_ab)).sum() / true_ab[0].size)


def image_metrics(
    true_rgb: np.ndarray, pred_rgb: np.ndarray, true_ab: np.ndarray, pred_ab: np.ndarray
) -> dict[str, float]:
    """Per-image metrics. RGB: float HxWx3 in [0, 1]. ab: normalized (ab/110), any layout, same shape."""
    rgb_mse = float(np.mean((pred_rgb - true_rgb) ** 2))
    c_pred, c_true = colorfulness(pred_rgb), colorfulness(true_rgb)
    return {
        "ab_mse": float(np.mean((np.asarray(pred_ab, np.float64) - true_ab) ** 2)),  # float64, as batch_metrics
        "rgb_mse": rgb_mse,
        "psnr": psnr(true_rgb, pred_rgb, rgb_mse),
        "ssim": ssim(true_rgb, pred_rgb),
        "colorfulness": c_pred,
        "colorfulness_truth": c_true,
        "colorfulness_gap": abs(c_pred - c_true),
        "ab_hist": ab_hist(np.asarray(true_ab, np.float64), np.asarray(pred_ab, np.float64)),
    }
