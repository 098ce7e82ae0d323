"""Image-quality metrics with their conventions stated, shared by the prepare, train and evaluate stages.

Conventions: images are float RGB in [0, 1], rebuilt from the true L and the predicted ab, so a grayscale
prediction (ab = 0) already scores well; always compare against that baseline. The two the literature
reports are computed as it does, so numbers can be set side by side:

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

**One table.** :data:`METRICS` holds every metric of the evaluation table as one :class:`Metric` entry:
its name, which direction is better (``None``: a column that ranks nothing, the colourfulness of the
prediction and of the truth), how a batch is scored (a function of a :class:`Batch`, on the batch's
device, float64), how it is displayed (its label in tables, its cell format in ``metrics.md``) and
whether runs are compared on it by default. Everything else is read from it: :data:`COLUMNS` (the
evaluation table's columns, in order), :data:`RANKABLE` and :data:`HIGHER_IS_BETTER` (what a champion
can be chosen by, and which way), :data:`COMPARED` (what runs are compared on by default), the evaluate
stage's table, study and MLflow metrics (``test_<name>``), the register stage's ``metric`` choices,
``scripts/compare_runs.py``.
Adding a metric is one function of a :class:`Batch` and one entry in :data:`TABLE`, plus its per-image
numpy definition in ``tests/metrics_reference.py``: those definitions, which the batch path is pinned to,
are the tests' (the pinning test requires one per column but LPIPS). The numpy functions kept here are
ones the code runs: :func:`colorfulness`, the prepare stage's dataset statistic (on uint8 images, in numpy so that
prepared data does not depend on torch's arithmetic), :func:`ssim` (scikit-image's, which the batch path
calls on the host) and :func:`edge_f1` (the upscaler's bench, not a column).

**Torch-free at import.** Torch is imported inside the functions that compute, and named in annotations
under ``TYPE_CHECKING`` only (model.lab and model.ab_bins import torch, so their constants are read inside
the function that uses them too). The reason: the register stage's settings validate ``register.metric``
against this table, and settings are read and validated without torch (tasks/settings/). The other way,
a torch-free table naming its implementations lazily in another module, would put each metric in two
places again (its entry here, its code there) joined by a dotted name nothing checks until it runs;
here an entry holds its function itself, and the price is a local ``import torch`` per function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

AB_CELLS = 27  # ab_hist's cells: 27 x 27 of model.ab_bins.GRID (10 Lab units) over ab in [-135, 135]
BASELINE = "grayscale baseline"


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk's M^(3): sigma_rgyb + 0.3 * mu_rgyb on RGB scaled to [0, 255] (uint8 input is
    taken in its own units). HxWx3 numpy: the prepare stage's statistic, and the batch path's reference."""
    x = rgb.astype(np.float64) * (255.0 if rgb.dtype != np.uint8 and rgb.max() <= 1.0 else 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def colorfulness_torch(rgb: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`colorfulness` per image of a (B,3,H,W) RGB batch in [0, 1], differentiable (the training
    loss's colourfulness term; ``eps`` keeps the square roots' gradients finite at grey)."""
    import torch

    x = rgb.to(torch.promote_types(rgb.dtype, torch.float32)) * 255.0  # float64 stays float64
    rg = (x[:, 0] - x[:, 1]).flatten(1)
    yb = (0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]).flatten(1)
    spread = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + eps)
    mean = torch.sqrt(rg.mean(1).square() + yb.mean(1).square() + eps)
    return spread + 0.3 * mean


def _cells(ab_norm: torch.Tensor) -> torch.Tensor:
    """The ab_hist cell of every pixel of normalized ab ``(B, 2, H, W)`` -> ``(B, H*W)``."""
    import torch

    from model.ab_bins import GRID as AB_CELL
    from model.lab import AB_SCALE as AB_UNITS

    half = AB_CELLS // 2
    c = torch.round(ab_norm.double() * AB_UNITS / AB_CELL).clamp(-half, half).to(torch.int64) + half
    return (c[:, 0] * AB_CELLS + c[:, 1]).flatten(1)


def ab_hist_torch(true_ab: torch.Tensor, pred_ab: torch.Tensor) -> torch.Tensor:
    """Per image, the intersection of the predicted and true ab histograms (see the module's notes):
    ``(B,)`` float64 in [0, 1], NaN for an image with a NaN prediction."""
    import torch

    b, n, cells = true_ab.shape[0], true_ab[0, 0].numel(), AB_CELLS * AB_CELLS
    offsets = torch.arange(b, device=true_ab.device)[:, None] * cells

    def hist(ab: torch.Tensor) -> torch.Tensor:
        return torch.bincount((_cells(torch.nan_to_num(ab)) + offsets).flatten(), minlength=b * cells).view(b, cells)

    inter = torch.minimum(hist(true_ab), hist(pred_ab)).sum(1).double() / n
    return torch.where(pred_ab.isnan().flatten(1).any(1), torch.nan, inter)


def gray_baseline(l_norm: torch.Tensor) -> torch.Tensor:
    """The prediction 'no colour at all': ab = 0 for every pixel. A model that does not beat it on the
    colour metrics has learned nothing (it still scores well on PSNR/SSIM, which reward the exact L)."""
    import torch

    return torch.zeros(l_norm.shape[0], 2, *l_norm.shape[2:], dtype=l_norm.dtype, device=l_norm.device)


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


class Batch:
    """One batch to score: RGB ``(B,3,H,W)`` in [0, 1] rebuilt from the true L and the true and predicted
    ab, the normalized ab ``(B,2,H,W)``, all on one device, and the LPIPS scorer when there is one. Each
    metric is computed once (:meth:`value`), so one can be built on another (PSNR on the RGB MSE, the
    colourfulness gap on both colourfulnesses)."""

    def __init__(
        self,
        true_rgb: torch.Tensor,
        pred_rgb: torch.Tensor,
        true_ab: torch.Tensor,
        pred_ab: torch.Tensor,
        lpips: Lpips | None = None,
    ) -> None:
        self.true_rgb, self.pred_rgb, self.true_ab, self.pred_ab = true_rgb, pred_rgb, true_ab, pred_ab
        self.lpips = lpips
        self.t, self.p = true_rgb.double(), pred_rgb.double()  # float64 throughout: agrees with numpy to rounding
        self._values: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.true_ab)

    def value(self, name: str) -> torch.Tensor | list[float]:
        """Metric ``name`` per image: a ``(B,)`` float64 tensor where the batch is, or host floats."""
        if name not in self._values:
            self._values[name] = METRICS[name].batch(self)
        return self._values[name]


def _ab_mse(b: Batch) -> torch.Tensor:
    return (b.pred_ab.double() - b.true_ab.double()).square().flatten(1).mean(1)


def _rgb_mse(b: Batch) -> torch.Tensor:
    return (b.p - b.t).square().flatten(1).mean(1)


def _psnr(b: Batch) -> torch.Tensor:
    """+inf only for an exact match, NaN (ranked worst) for a non-finite prediction."""
    import torch

    rgb_mse = b.value("rgb_mse")
    psnr = torch.where(rgb_mse > 0, -10.0 * torch.log10(rgb_mse), torch.inf)  # data_range 1: 10 log10(1 / mse)
    return torch.where(rgb_mse.isfinite(), psnr, torch.nan)


def _ssim(b: Batch) -> list[float]:
    """scikit-image's, on the host: one copy of the batch there."""
    true_np, pred_np = (x.permute(0, 2, 3, 1).double().cpu().numpy() for x in (b.true_rgb, b.pred_rgb))
    return [ssim(t, p) for t, p in zip(true_np, pred_np, strict=True)]


def _lpips(b: Batch) -> list[float]:
    """NaN for every image when no LPIPS scorer is given or its backbone is missing (said elsewhere)."""
    scores = b.lpips(b.true_rgb, b.pred_rgb) if b.lpips is not None else None
    return scores if scores is not None else [math.nan] * len(b)


def _colorfulness(b: Batch) -> torch.Tensor:
    return colorfulness_torch(b.p, eps=0.0)


def _colorfulness_truth(b: Batch) -> torch.Tensor:
    return colorfulness_torch(b.t, eps=0.0)


def _colorfulness_gap(b: Batch) -> torch.Tensor:
    return (b.value("colorfulness") - b.value("colorfulness_truth")).abs()


def _ab_hist(b: Batch) -> torch.Tensor:
    return ab_hist_torch(b.true_ab, b.pred_ab)


def fixed(v: float) -> str:
    """A metrics.md cell: five decimals below 1, three above (PSNR in dB, colourfulness in 8-bit units)."""
    return f"{v:.5f}" if abs(v) < 1 else f"{v:.3f}"


@dataclass(frozen=True)
class Metric:
    """One metric of the evaluation table.

    ``higher_is_better``: which direction is better; ``None`` for a column that ranks nothing (a champion
    cannot be chosen by it, and no paired comparison is made of it). ``batch``: its per-image values on a
    :class:`Batch`. ``label``: its header in tables (metrics.md, compare_runs; default: the name, which is
    also its name in metrics.csv/json, per_image.csv and MLflow as ``test_<name>``). ``fmt``: its cells in
    metrics.md (a missing value is written ``missing`` whatever the format). ``compared``: whether runs
    are compared on it by default (scripts/compare_runs.py; a rankable metric only)."""

    name: str
    higher_is_better: bool | None
    batch: Callable[[Batch], Any]
    label: str = ""
    fmt: Callable[[float], str] = fixed
    compared: bool = True

    @property
    def header(self) -> str:
        return self.label or self.name

    def cell(self, v: float | str) -> str:
        if isinstance(v, str):
            return v
        return "missing" if math.isnan(v) else self.fmt(v)


TABLE: tuple[Metric, ...] = (
    Metric("ab_mse", False, _ab_mse, compared=False),  # normalized units (ab/110); rgb_mse says the same
    Metric("rgb_mse", False, _rgb_mse),
    Metric("psnr", True, _psnr),
    Metric("ssim", True, _ssim),
    Metric("lpips", False, _lpips, compared=False),  # missing where its backbone is
    Metric("colorfulness", None, _colorfulness),  # the prediction's
    Metric("colorfulness_truth", None, _colorfulness_truth),
    Metric("colorfulness_gap", False, _colorfulness_gap),  # |prediction - truth| per image
    Metric("ab_hist", True, _ab_hist),
)
METRICS: dict[str, Metric] = {m.name: m for m in TABLE}
# The columns of an evaluation table, in order.
COLUMNS: tuple[str, ...] = tuple(METRICS)
# The study's headline metric (its first column and comparisons; register.metric's default).
HEADLINE = "rgb_mse"
# What a champion can be chosen by and variants are compared on: the headline, then the table's order.
RANKABLE: tuple[str, ...] = (
    HEADLINE,
    *(m.name for m in TABLE if m.higher_is_better is not None and m.name != HEADLINE),
)
HIGHER_IS_BETTER: dict[str, bool] = {name: bool(METRICS[name].higher_is_better) for name in RANKABLE}
# What runs are compared on by default (scripts/compare_runs.py).
COMPARED: tuple[str, ...] = tuple(name for name in RANKABLE if METRICS[name].compared)


def batch_metrics(
    true_rgb: torch.Tensor,
    pred_rgb: torch.Tensor,
    true_ab: torch.Tensor,
    pred_ab: torch.Tensor,
    lpips: Lpips | None = None,
) -> dict[str, list[float]]:
    """Every metric of :data:`METRICS` per image of a batch, computed where the tensors are: RGB
    (B,3,H,W) in [0, 1], normalized ab (B,2,H,W). Float64 throughout, so it agrees with the numpy
    definitions to rounding; one transfer to the host at the end (SSIM: scikit-image's, on the host;
    LPIPS: ``lpips``'s, NaN without one)."""
    import torch

    batch = Batch(true_rgb, pred_rgb, true_ab, pred_ab, lpips)
    values = {name: batch.value(name) for name in COLUMNS}
    on_device = [name for name, v in values.items() if isinstance(v, torch.Tensor)]
    if on_device:
        stacked = torch.stack([values[name] for name in on_device]).cpu().tolist()
        values.update(zip(on_device, stacked, strict=True))
    return {name: list(values[name]) for name in COLUMNS}


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
        import torch

        if self.net is None:
            return None
        self.net.to(true_rgb.device)  # where the scored batch is (a no-op after the first)
        with torch.no_grad():
            return self.net(true_rgb * 2 - 1, pred_rgb * 2 - 1).flatten().tolist()


def edge_f1(pred_rgb: np.ndarray, true_rgb: np.ndarray, sigma: float = 1.0, tolerance: int = 1) -> float:
    """F1 of Canny edge maps against the original's, matches allowed ``tolerance`` pixels away (the
    boundary F-measure of BSDS, simplified). A full-reference structure score for super-resolution:
    blur loses edges (recall falls), invented texture adds false ones (precision falls), while pixel
    SSIM rewards blur over plausible detail. Not a column of the colorization table."""
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
