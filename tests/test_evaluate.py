"""Metrics (the table in model.metrics, pinned to the numpy reference in tests/metrics_reference.py), the
baseline row, missing LPIPS, the evaluation as a value, and champion selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from metrics_reference import image_metrics

from model.lab import lab_norm_to_rgb
from model.metrics import BASELINE, COLUMNS, Lpips, batch_metrics, colorfulness, gray_baseline
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
    numpy definitions' to float64 rounding, including an exact match (PSNR +inf) and a NaN prediction.
    Every column of the table comes back; LPIPS, with no scorer given, as NaN."""
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
    assert list(batch) == list(COLUMNS) and all(len(v) == 5 for v in batch.values())
    for i in range(5):
        ref = image_metrics(
            true_rgb[i].permute(1, 2, 0).double().numpy(),
            pred_rgb[i].permute(1, 2, 0).double().numpy(),
            true_ab[i].numpy(),
            pred_ab[i].numpy(),
        )
        assert set(ref) == set(COLUMNS) - {"lpips"}
        for k, v in ref.items():
            assert batch[k][i] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), (i, k)
    assert batch["psnr"][1] == math.inf and math.isnan(batch["psnr"][3])
    assert all(math.isnan(v) for v in batch["lpips"])


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


def test_the_metric_table_is_the_one_list_of_metrics() -> None:
    """Columns, what a champion can be ranked by and which way, register's choices: all read from
    model.metrics.TABLE, and importable without torch (register's settings validate against it)."""
    import subprocess
    import sys
    import typing

    from pydantic import ValidationError

    from model import metrics
    from tasks.settings.register import Settings

    assert metrics.COLUMNS == tuple(m.name for m in metrics.TABLE) == tuple(metrics.METRICS)
    ranked = {m.name for m in metrics.TABLE if m.higher_is_better is not None}
    assert metrics.RANKABLE[0] == metrics.HEADLINE and set(metrics.RANKABLE) == ranked == set(metrics.HIGHER_IS_BETTER)
    assert all(metrics.HIGHER_IS_BETTER[m] is metrics.METRICS[m].higher_is_better for m in ranked)
    assert set(typing.get_args(Settings.model_fields["metric"].annotation)) == ranked
    with pytest.raises(ValidationError):
        Settings(metric="colorfulness")  # a column that ranks nothing
    code = "import sys, model.metrics, tasks.settings.register, tasks.settings.evaluate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def _scored(rng: np.random.Generator, n: int, head: str | None = None, shift: float = 0.0):
    from tasks.evaluate import Scored

    rows = [
        {**dict.fromkeys(COLUMNS, 0.5), "rgb_mse": float(x) + shift, "lpips": math.nan} for x in rng.random(n) * 0.01
    ]
    means = {k: float(np.mean([r[k] for r in rows])) for k in COLUMNS}
    return Scored({**means, "n_images": n}, rows, head)


def test_the_evaluation_is_a_value_made_from_the_scores_without_mlflow(tmp_path: Path) -> None:
    """Table rows by variant and seed after the baseline, per-image rows labelled by seed, the study in
    the trained models' order, what each MLflow run is given, and the files: all from plain scores."""
    import json

    from tasks.evaluate import evaluation

    rng = np.random.default_rng(0)
    trained = [{"variant": v, "seed": s} for v in ("max", "average") for s in (0, 1)]
    scores = {(t["variant"], t["seed"]): _scored(rng, 6, "regression", 0.01 * (t["variant"] == "max")) for t in trained}
    ev = evaluation(trained, _scored(rng, 6), scores, "offline", 0.38)
    assert [(r["variant"], r["seed"]) for r in ev.table] == [
        (BASELINE, None),
        ("average", 0),
        ("average", 1),
        ("max", 0),
        ("max", 1),
    ]
    assert ev.variants == ["max", "average"] and ev.table[1]["head"] == "regression"
    assert {r["model"] for r in ev.per_image_rows} == {
        BASELINE,
        "average-seed0",
        "average-seed1",
        "max-seed0",
        "max-seed1",
    }
    by_variant = {r["variant"]: r for r in ev.variant_table}
    assert by_variant["max"]["n_seeds"] == 2 and by_variant[BASELINE]["n_seeds"] == 0
    assert by_variant["max"]["rgb_mse"] == pytest.approx(
        (scores["max", 0].means["rgb_mse"] + scores["max", 1].means["rgb_mse"]) / 2
    )
    pairs = {(c["a"], c["b"]) for c in ev.comparisons if c["metric"] == "rgb_mse"}
    assert pairs == {("max", "average"), ("max", BASELINE), ("average", BASELINE)}
    assert not any(c["metric"] == "lpips" for c in ev.comparisons)  # missing: no interval to give
    logged = dict(((m, tags["test_lpips"]), metrics) for m, metrics, tags in ev.test_metrics())
    assert set(logged) == {((v, s), "missing: offline") for v in ("max", "average") for s in (0, 1)}
    assert all("test_lpips" not in m and m["test_rgb_mse"] > 0 for m in logged.values())
    md = ev.markdown()
    assert "| max - average | rgb_mse |" in md and "LPIPS missing: offline" in md
    assert ev.plot_diffs().keys() >= {("rgb_mse", "max", "average"), ("colorfulness_gap", "max", BASELINE)}
    ev.write(tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["grid_columns"] == ["gray", "max", "average", "truth"] and len(written["rows"]) == 5
    assert (tmp_path / "metrics.md").read_text() == md
    assert len((tmp_path / "per_image.csv").read_text().splitlines()) == 1 + 5 * 6
    assert ev.manifest()["variants"] == ["max", "average"]


def test_the_temperature_is_in_the_evaluate_key_only_when_a_classification_model_is_evaluated(
    tmp_path: Path, caplog
) -> None:
    """Regression heads have no decoding: ``evaluate.temperature`` on a regression-only run keeps the key
    (no rerun, no duplicate registry version) and says it is ignored; with a classification model it is
    the key's."""
    import logging

    from model.choices import DEFAULT_VIVIDNESS
    from tasks.evaluate import Settings, plan

    prepared = {"stage": "prepare", "key": "p", "content": "p"}

    def trained(*heads: str) -> list[dict]:
        return [
            {"stage": "train", "key": f"t{i}", "content": f"t{i}", "variant": "max", "seed": i, "spec": {"head": h}}
            for i, h in enumerate(heads)
        ]

    def key(temperature: float, *heads: str) -> str:
        return plan(Settings(temperature=temperature), prepared, trained(*heads), tmp_path)["key"]

    with caplog.at_level(logging.WARNING, logger="tasks.evaluate"):
        assert key(0.2, "regression") == key(DEFAULT_VIVIDNESS, "regression") == key(1.0, "regression")
    ignored = [r for r in caplog.records if "evaluate.temperature=0.2 is ignored" in r.getMessage()]
    assert len(ignored) == 1 and ignored[0].levelno == logging.WARNING
    assert not any(f"temperature={DEFAULT_VIVIDNESS:g} " in r.getMessage() for r in caplog.records)  # the default
    assert "temperature" not in plan(Settings(), prepared, trained("regression"), tmp_path)["config"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.evaluate"):
        assert key(0.2, "regression", "classification") != key(DEFAULT_VIVIDNESS, "regression", "classification")
        assert key(0.2, "classification") != key(1.0, "classification")
    assert not caplog.records
    vivid = plan(Settings(temperature=0.2), prepared, trained("classification"), tmp_path)
    assert vivid["config"]["temperature"] == 0.2
