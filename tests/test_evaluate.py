"""Metrics, the baseline row, missing LPIPS, and champion selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.lab import lab_norm_to_rgb
from model.metrics import BASELINE, COLUMNS, Lpips, batch_metrics, colorfulness, gray_baseline, image_metrics
from tasks.evaluate import markdown
from tasks.register import beats_baseline, choose


def test_metrics_agree_with_hand_computed_values() -> None:
    truth = np.full((16, 16, 3), 0.5)  # SSIM's 11x11 window needs 11 px or more
    pred = truth.copy()
    pred[..., 0] += 0.1  # red off by 0.1 everywhere
    ab_t, ab_p = np.zeros((2, 8, 8)), np.full((2, 8, 8), 0.2)
    m = image_metrics(truth, pred, ab_t, ab_p)
    assert m["rgb_mse"] == pytest.approx(0.01 / 3)
    assert m["ab_mse"] == pytest.approx(0.04)
    assert m["psnr"] == pytest.approx(10 * math.log10(1 / (0.01 / 3)))
    assert m["ssim"] < 1 and image_metrics(truth, truth, ab_t, ab_t)["ssim"] == pytest.approx(1.0)


def test_the_batched_device_metrics_equal_the_per_image_reference() -> None:
    """The evaluate stage scores a batch at once where the tensors are; the numbers are the per-image
    numpy definitions' to float64 rounding, including an exact match (PSNR +inf) and a NaN prediction."""
    g = torch.Generator().manual_seed(0)
    l_norm = torch.rand(5, 1, 24, 40, generator=g)
    true_ab, pred_ab = (
        (torch.rand(5, 2, 24, 40, generator=g) - 0.5) * 0.8,
        (torch.rand(5, 2, 24, 40, generator=g) - 0.5),
    )
    pred_ab[1] = true_ab[1]
    pred_ab[3, :, :4] = math.nan
    true_rgb, pred_rgb = lab_norm_to_rgb(l_norm, true_ab), lab_norm_to_rgb(l_norm, pred_ab)
    batch = batch_metrics(true_rgb, pred_rgb, true_ab, pred_ab)
    for i in range(5):
        ref = image_metrics(
            true_rgb[i].permute(1, 2, 0).double().numpy(),
            pred_rgb[i].permute(1, 2, 0).double().numpy(),
            true_ab[i].numpy(),
            pred_ab[i].numpy(),
        )
        for k, v in batch.items():
            assert v[i] == pytest.approx(ref[k], rel=1e-9, abs=1e-12, nan_ok=True), (i, k)
    assert batch["psnr"][1] == math.inf and math.isnan(batch["psnr"][3])


def test_colorfulness_matches_hasler_suesstrunk_by_hand() -> None:
    red = np.zeros((4, 4, 3))
    red[..., 0] = 1.0  # rg = 255, yb = 127.5 everywhere: no spread, only mean
    assert colorfulness(red) == pytest.approx(0.3 * math.hypot(255, 127.5))
    gray = np.full((4, 4, 3), 0.3)
    assert colorfulness(gray) == pytest.approx(0.0)
    half = np.zeros((2, 1, 3), np.uint8)
    half[0, 0] = (255, 0, 0)  # uint8 input is taken in its own 0..255 units
    rg, yb = np.array([255.0, 0.0]), np.array([127.5, 0.0])
    assert colorfulness(half) == pytest.approx(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def test_grayscale_baseline_predicts_zero_ab() -> None:
    l_norm = torch.rand(3, 1, 32, 32)
    ab = gray_baseline(l_norm)
    assert ab.shape == (3, 2, 32, 32) and not ab.any()


def test_missing_lpips_backbone_is_reported_missing_not_scored(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(
        __import__("model.pretrained").pretrained.URLS, "alexnet", "http://127.0.0.1:9/alexnet-owt-7be5be79.pth"
    )
    lp = Lpips(enabled=True)
    assert lp.missing and "AlexNet backbone" in lp.missing
    assert lp(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)) is None
    row = {"variant": "max", **dict.fromkeys(COLUMNS, 0.5), "lpips": math.nan, "n_images": 3}
    md = markdown([row], lp.missing)
    assert "| missing |" in md and "LPIPS missing: AlexNet backbone" in md


def _row(variant: str, **values: float) -> dict:
    base = {c: 0.5 for c in COLUMNS}
    base.update(values)
    return {"variant": variant, **base}


def test_champion_is_chosen_by_metric_with_tie_breaker_and_never_the_baseline() -> None:
    table = [
        _row(BASELINE, rgb_mse=0.001),
        _row("concat", rgb_mse=0.02, ssim=0.8),
        _row("max", rgb_mse=0.01, ssim=0.7),
        _row("average", rgb_mse=0.01, ssim=0.9),
    ]
    assert choose(table, "rgb_mse", "ssim")["variant"] == "average"  # tie on rgb_mse, higher ssim wins
    assert choose(table, "ssim", "rgb_mse")["variant"] == "average"
    assert choose(table, "psnr", "ssim")["variant"] == "average"  # psnr ties everywhere -> ssim
    assert not beats_baseline(table, choose(table, "rgb_mse", "ssim"), "rgb_mse")
    with pytest.raises(ValueError, match="no variant has a finite value for lpips"):
        choose([_row(BASELINE), _row("max", lpips=math.nan)], "lpips", "ssim")


def _wang_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM as Wang et al. (2004) define it, written out with scipy: per channel, local statistics under
    an 11x11 Gaussian window (sigma 1.5), population (co)variances, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with
    L = 1; the SSIM map's mean over the pixels whose window fits in the image; then the channels' mean."""
    from scipy.ndimage import gaussian_filter

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=1.5, truncate=3.5)

    c1, c2, pad = 0.01**2, 0.03**2, 5
    out = []
    for c in range(x.shape[-1]):
        a, b = x[..., c], y[..., c]
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        out.append(ssim_map[pad:-pad, pad:-pad].mean())
    return float(np.mean(out))


def test_ssim_is_wang_et_al_gaussian_window_and_psnr_the_whole_image() -> None:
    """The published SSIM (as papers, the original project's table among them, report it), computed
    independently above, not scikit-image's default 7x7 uniform window with sample covariances."""
    from skimage import data
    from skimage.metrics import structural_similarity

    from model.metrics import ssim

    truth = data.astronaut()[100:164, 150:230].astype(np.float64) / 255
    rng = np.random.default_rng(0)
    pred = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1)
    assert ssim(truth, pred) == pytest.approx(_wang_ssim(truth, pred), rel=1e-9)
    uniform = structural_similarity(truth, pred, channel_axis=-1, data_range=1.0)
    assert abs(ssim(truth, pred) - uniform) > 1e-3  # the convention makes a visible difference
    rgb_mse = float(np.mean((pred - truth) ** 2))  # over every pixel, no border cropped
    m = image_metrics(truth, pred, np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    assert m["psnr"] == pytest.approx(10 * math.log10(1 / rgb_mse)) and m["ssim"] == ssim(truth, pred)


def test_ab_hist_rewards_the_right_colours_and_is_one_for_the_truth() -> None:
    """Half the truth grey and half red-ish: grey scores 0.5, the truth 1, the right colours in the wrong
    places still 1 (a histogram), a vivid wrong hue 0."""
    truth = np.zeros((2, 4, 8))
    truth[:, :, 4:] = np.array([60.0, 40.0]).reshape(2, 1, 1) / 110
    m = {
        name: image_metrics(np.zeros((16, 16, 3)), np.zeros((16, 16, 3)), truth, pred)["ab_hist"]
        for name, pred in {
            "grey": np.zeros_like(truth),
            "truth": truth,
            "mirrored": truth[:, :, ::-1].copy(),
            "wrong hue": np.full_like(truth, -50 / 110),
        }.items()
    }
    assert m == {"grey": 0.5, "truth": 1.0, "mirrored": 1.0, "wrong hue": 0.0}
