"""Image-quality metrics with their conventions stated, shared by the prepare and evaluate stages.

Conventions: images are float RGB in [0, 1], HxWx3 (numpy) unless noted, rebuilt from the true L and
the predicted ab, so a grayscale prediction (ab = 0) already scores well; always compare against that
baseline. The two the literature reports are computed as it does, so numbers can be set side by side:

- PSNR: ``10 log10(1 / MSE)`` over every pixel and channel of the RGB image in [0, 1] (data range 1), no
  border cropped.
- SSIM: Wang et al. (2004), as papers report it (the original project's table too): an 11x11 Gaussian
  window with sigma 1.5, population (not sample) variances and covariance, K1 = 0.01, K2 = 0.03, data
  range 1; per RGB channel, the SSIM map averaged over the pixels whose whole window lies in the image
  (5 px from each border), then over the channels (scikit-image's ``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False``, not its default 7x7 uniform window with sample covariances: on the
  demo's test crops the two differ by 0.004-0.013). Images must be at least 11 px on a side.

Colourfulness is Hasler & Suesstrunk (2003) on 8-bit-scaled RGB (their paper's units).

``ab_hist`` rewards the right colours, not just the right amount of colour: the intersection of the
image's ab histogram with the truth's, both over 10x10 cells of ab (model.ab_bins' grid) as fractions of
the pixels, so 1 means the same colours in the same proportions (wherever they are). A grey prediction
scores the share of the truth's pixels that are grey; a vivid one in the wrong hue scores less than that.

Two paths, one definition: :func:`image_metrics` scores one image in numpy (the reference), and
:func:`batch_metrics` scores a whole batch of tensors on their device in float64 (the evaluate stage,
which then needs no per-image copy to the host but for SSIM); a test pins them to each other.
"""

from __future__ import annotations

import numpy as np
import torch

from model.ab_bins import GRID as AB_CELL
from model.lab import AB_SCALE as AB_UNITS

AB_CELLS = 27  # ab_hist's cells: 27 x 27 of AB_CELL (10 Lab units) over ab in [-135, 135]


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk's M^(3): sigma_rgyb + 0.3 * mu_rgyb on RGB scaled to [0, 255]."""
    x = rgb.astype(np.float64) * (255.0 if rgb.dtype != np.uint8 and rgb.max() <= 1.0 else 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def colorfulness_torch(rgb: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`colorfulness` per image of a (B,3,H,W) RGB batch in [0, 1], differentiable (the training
    loss's colourfulness term; ``eps`` keeps the square roots' gradients finite at grey)."""
    x = rgb.to(torch.promote_types(rgb.dtype, torch.float32)) * 255.0  # float64 stays float64
    rg = (x[:, 0] - x[:, 1]).flatten(1)
    yb = (0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]).flatten(1)
    spread = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + eps)
    mean = torch.sqrt(rg.mean(1).square() + yb.mean(1).square() + eps)
    return spread + 0.3 * mean


BASELINE = "grayscale baseline"
# Which direction is better, per metric a champion can be chosen by: the one list of those metrics.
HIGHER_IS_BETTER = {
    "rgb_mse": False,
    "ab_mse": False,
    "psnr": True,
    "ssim": True,
    "lpips": False,
    "colorfulness_gap": False,
    "ab_hist": True,
}
RANKABLE = tuple(HIGHER_IS_BETTER)
# The columns of an evaluation table, in order.
COLUMNS = (
    *("ab_mse", "rgb_mse", "psnr", "ssim", "lpips"),
    *("colorfulness", "colorfulness_truth", "colorfulness_gap", "ab_hist"),
)


def _cells(ab_norm: torch.Tensor) -> torch.Tensor:
    """The ab_hist cell of every pixel of normalized ab ``(B, 2, H, W)`` -> ``(B, H*W)``."""
    half = AB_CELLS // 2
    c = torch.round(ab_norm.double() * AB_UNITS / AB_CELL).clamp(-half, half).to(torch.int64) + half
    return (c[:, 0] * AB_CELLS + c[:, 1]).flatten(1)


def ab_hist_torch(true_ab: torch.Tensor, pred_ab: torch.Tensor) -> torch.Tensor:
    """Per image, the intersection of the predicted and true ab histograms (see the module's notes):
    ``(B,)`` float64 in [0, 1], NaN for an image with a NaN prediction."""
    b, n, cells = true_ab.shape[0], true_ab[0, 0].numel(), AB_CELLS * AB_CELLS
    offsets = torch.arange(b, device=true_ab.device)[:, None] * cells

    def hist(ab: torch.Tensor) -> torch.Tensor:
        return torch.bincount((_cells(torch.nan_to_num(ab)) + offsets).flatten(), minlength=b * cells).view(b, cells)

    inter = torch.minimum(hist(true_ab), hist(pred_ab)).sum(1).double() / n
    return torch.where(pred_ab.isnan().flatten(1).any(1), torch.nan, inter)


def gray_baseline(l_norm: torch.Tensor) -> torch.Tensor:
    """The prediction 'no colour at all': ab = 0 for every pixel. A model that does not beat it on the
    colour metrics has learned nothing (it still scores well on PSNR/SSIM, which reward the exact L)."""
    return torch.zeros(l_norm.shape[0], 2, *l_norm.shape[2:], dtype=l_norm.dtype, device=l_norm.device)


def _psnr(true_rgb: np.ndarray, pred_rgb: np.ndarray, rgb_mse: float) -> float:
    """scikit-image's PSNR; +inf only for an exact match, NaN (ranked worst) for a non-finite prediction."""
    from skimage.metrics import peak_signal_noise_ratio

    if not np.isfinite(rgb_mse):
        return float("nan")
    return float(peak_signal_noise_ratio(true_rgb, pred_rgb, data_range=1.0)) if rgb_mse > 0 else float("inf")


def ssim(true_rgb: np.ndarray, pred_rgb: np.ndarray) -> float:
    """SSIM of two float HxWx3 RGB images in [0, 1], Wang et al.'s (see the module docstring)."""
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            true_rgb,
            pred_rgb,
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def _ab_hist(true_ab: np.ndarray, pred_ab: np.ndarray) -> float:
    """:func:`ab_hist_torch` for one image in numpy, ab ``(2, H, W)``: the reference it is tested against."""
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
        "psnr": _psnr(true_rgb, pred_rgb, rgb_mse),
        "ssim": ssim(true_rgb, pred_rgb),
        "colorfulness": c_pred,
        "colorfulness_truth": c_true,
        "colorfulness_gap": abs(c_pred - c_true),
        "ab_hist": _ab_hist(np.asarray(true_ab, np.float64), np.asarray(pred_ab, np.float64)),
    }


def batch_metrics(
    true_rgb: torch.Tensor, pred_rgb: torch.Tensor, true_ab: torch.Tensor, pred_ab: torch.Tensor
) -> dict[str, list[float]]:
    """:func:`image_metrics` but SSIM for a batch, computed where the tensors are: RGB (B,3,H,W) in
    [0, 1], normalized ab (B,2,H,W). Float64 throughout, so it agrees with the numpy path to rounding;
    one transfer to the host at the end."""
    t, p = true_rgb.double(), pred_rgb.double()
    rgb_mse = (p - t).square().flatten(1).mean(1)
    psnr = torch.where(rgb_mse > 0, -10.0 * torch.log10(rgb_mse), torch.inf)  # data_range 1: 10 log10(1 / mse)
    psnr = torch.where(rgb_mse.isfinite(), psnr, torch.nan)
    c_pred, c_true = colorfulness_torch(p, eps=0.0), colorfulness_torch(t, eps=0.0)
    out = {
        "ab_mse": (pred_ab.double() - true_ab.double()).square().flatten(1).mean(1),
        "rgb_mse": rgb_mse,
        "psnr": psnr,
        "colorfulness": c_pred,
        "colorfulness_truth": c_true,
        "colorfulness_gap": (c_pred - c_true).abs(),
        "ab_hist": ab_hist_torch(true_ab, pred_ab),
    }
    stacked = torch.stack(list(out.values())).cpu().tolist()
    return dict(zip(out, stacked, strict=True))


class Lpips:
    """LPIPS (AlexNet, v0.1 linear heads) on RGB mapped to [-1, 1], as the lpips package expects.

    The AlexNet backbone is torchvision's ImageNet file; when it is not on disk (offline), ``missing``
    says why and no score is produced: a random backbone would give numbers that mean nothing.
    """

    def __init__(self, enabled: bool = True) -> None:
        from model.pretrained import locate

        self.net = None
        self.missing: str | None = None
        if not enabled:
            self.missing = "disabled by config (evaluate.lpips=false)"
            return
        found = locate("alexnet", allow_download=True)
        if not found.available:
            self.missing = f"AlexNet backbone weights unavailable: {found.reason}"
            return
        import lpips

        self.net = lpips.LPIPS(net="alex", verbose=False).eval()

    def __call__(self, true_rgb: torch.Tensor, pred_rgb: torch.Tensor) -> list[float] | None:
        """(B,3,H,W) in [0,1] -> one score per image, or None when missing."""
        if self.net is None:
            return None
        self.net.to(true_rgb.device)  # where the scored batch is (a no-op after the first)
        with torch.no_grad():
            return self.net(true_rgb * 2 - 1, pred_rgb * 2 - 1).flatten().tolist()


def edge_f1(pred_rgb: np.ndarray, true_rgb: np.ndarray, sigma: float = 1.0, tolerance: int = 1) -> float:
    """F1 of Canny edge maps against the original's, matches allowed ``tolerance`` pixels away (the
    boundary F-measure of BSDS, simplified). A full-reference structure score for super-resolution:
    blur loses edges (recall falls), invented texture adds false ones (precision falls), while pixel
    SSIM rewards blur over plausible detail."""
    from scipy import ndimage
    from skimage import color, feature

    def edges(rgb: np.ndarray) -> np.ndarray:
        return feature.canny(color.rgb2gray(rgb), sigma=sigma)

    pred, true = edges(pred_rgb), edges(true_rgb)
    near_pred = ndimage.binary_dilation(pred, iterations=tolerance) if tolerance else pred
    near_true = ndimage.binary_dilation(true, iterations=tolerance) if tolerance else true
    precision = (pred & near_true).sum() / max(pred.sum(), 1)
    recall = (true & near_pred).sum() / max(true.sum(), 1)
    return float(2 * precision * recall / max(precision + recall, 1e-12))
