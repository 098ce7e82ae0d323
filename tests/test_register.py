"""The register stage's decision and what it records, without MLflow: the champion and why (a value),
the version's tags (only what the manifest does not say, and what readers of the registry use), and
``register.onnx=false`` skipping the export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from model.metrics import BASELINE, COLUMNS
from tasks import register


def _row(variant: str, seed: int | None = None, **values: float) -> dict:
    return {"variant": variant, "seed": seed, **dict.fromkeys(COLUMNS, 0.5), "lpips": math.nan, **values}


def _variant(variant: str, n_seeds: int, rgb_mse: float, rgb_mse_std: float) -> dict:
    stds = {f"{c}_std": 0.0 for c in COLUMNS}
    return {**_row(variant, rgb_mse=rgb_mse), **stds, "rgb_mse_std": rgb_mse_std, "n_seeds": n_seeds}


def _evaluated() -> dict:
    table = [
        _row(BASELINE, rgb_mse=0.02),
        _row("concat", 0, rgb_mse=0.012),
        _row("concat", 1, rgb_mse=0.010),
        _row("max", 0, rgb_mse=0.009),
        _row("max", 1, rgb_mse=0.019),
    ]
    variant_table = [
        _variant(BASELINE, 0, 0.02, 0.0),
        _variant("concat", 2, 0.011, 0.0014),
        _variant("max", 2, 0.014, 0.0071),
    ]
    interval = {
        "a": "concat",
        "b": BASELINE,
        "metric": "rgb_mse",
        "significant": True,
        "ci_low": -0.01,
        "ci_high": -0.001,
    }
    other = {**interval, "metric": "ssim", "significant": False}
    return {"table": table, "variant_table": variant_table, "comparisons": [other, interval], "temperature": 0.38}


def _trained(tmp_path: Path) -> list[dict]:
    out = []
    for variant in ("concat", "max"):
        for seed in (0, 1):
            folder = tmp_path / f"{variant}{seed}"
            folder.mkdir()
            spec = {"fusion": variant, "head": "regression", "image_size": 32, "temperature": 0.38}
            (folder / "model.json").write_text(json.dumps(spec))
            key = f"k-{variant}-{seed}"
            out.append(
                {
                    "stage": "train",
                    "key": key,
                    "content": key,
                    "variant": variant,
                    "seed": seed,
                    "folder": str(folder),
                    "mlflow_run_id": f"run-{variant}-{seed}",
                    "spec": spec,
                }
            )
    return out


def test_the_champion_and_why_are_decided_from_the_evaluation_alone(tmp_path: Path) -> None:
    """The variant by its mean over seeds (concat, though max has the single best model), the seed by its
    own score, whether it beats the baseline and whether the interval says so too."""
    champion_pool = _trained(tmp_path)
    champion = register.decide(_evaluated(), champion_pool, "rgb_mse", "ssim")
    assert (champion.variant, champion.seed, champion.n_seeds) == ("concat", 1, 2)
    assert champion.value == 0.011 and champion.model_value == 0.010
    assert champion.beats_baseline and champion.beats_baseline_95ci
    assert champion.vs_baseline["metric"] == "rgb_mse" and champion.trained["key"] == "k-concat-1"
    assert champion.description() == (
        "Chosen by rgb_mse (tie-breaker ssim, mean over seeds) on the test split; this version is seed 1.\n"
        "grayscale baseline: rgb_mse=0.02\nconcat: rgb_mse=0.011 ± 0.0014 over 2 seeds\n"
        "max: rgb_mse=0.014 ± 0.0071 over 2 seeds"
    )
    by_ssim = register.decide(_evaluated(), champion_pool, "ssim", "rgb_mse")
    assert not by_ssim.beats_baseline and not by_ssim.beats_baseline_95ci  # 0.5 everywhere: no better than grey
    assert by_ssim.vs_baseline["metric"] == "ssim"
    by_psnr = register.decide(_evaluated(), champion_pool, "psnr", "ssim")
    assert by_psnr.vs_baseline is None and not by_psnr.beats_baseline_95ci  # no comparison on psnr here
    assert (by_ssim.variant, by_ssim.seed) == ("concat", 1)  # ssim ties: rgb_mse breaks them


def test_the_version_tags_repeat_only_what_readers_of_the_registry_use(tmp_path: Path) -> None:
    champion = register.decide(_evaluated(), _trained(tmp_path), "rgb_mse", "ssim")
    tags = register.version_tags(champion, {"head": "regression"}, {"attached": True})
    assert tags == {
        "variant": "concat",
        "head": "regression",
        "test_rgb_mse": "0.01",
        "test_rgb_mse_mean": "0.011",
        "beats_baseline": "True",
        "train_key": "k-concat-1",
        "onnx_export": "attached",
    }
    vivid = register.version_tags(
        champion, {"head": "classification", "temperature": 0.3}, {"attached": False, "reason": "x"}
    )
    assert vivid["vividness"] == "0.3" and vivid["onnx_export"] == "none" and vivid["onnx_reason"] == "x"
    spec = {"head": "regression"}
    fields = register.manifest(champion, spec, register.Settings(), 3, "models:/m-1", {"attached": True})
    said = {"seed", "n_seeds", "metric", "beats_baseline_95ci"}
    assert said <= set(fields) and not said & set(tags)  # the manifest's alone


def test_register_onnx_false_registers_for_the_torch_engine_without_exporting(tmp_path: Path, monkeypatch) -> None:
    """No export and no parity check: the manifest records ``onnx: {attached: false, reason}`` as a failed
    export is recorded, the version is logged without one and tagged so."""
    s = register.Settings(onnx=False)
    assert register.Settings().onnx and "torch engine only" in register.Settings.model_fields["onnx"].description
    evaluated = {"stage": "evaluate", "key": "e", "content": "e", **_evaluated()}
    plan = register.plan(s, evaluated, _trained(tmp_path), tmp_path / "work")

    def no_export(*args, **kw):
        raise AssertionError("register.onnx=false must not export")

    logged = {}

    class FakeTracker:
        def __init__(self, workdir: Path) -> None:
            self.workdir = workdir

        def run_exists(self, run_id: str) -> bool:
            return True

    def log_version(tracker, run_id, folder, spec_path, scratch, name, alias, onnx_path=None, **kw):
        logged.update(run_id=run_id, onnx_path=onnx_path, **kw)
        return 7, "models:/m-7"

    monkeypatch.setattr(register, "_try_onnx", no_export)
    monkeypatch.setattr(register, "Tracker", FakeTracker)
    monkeypatch.setattr(register, "log_version", log_version)
    result = register.run(plan).manifest
    assert result["onnx"] == {"attached": False, "reason": "register.onnx=false"} and result["version"] == 7
    assert logged["onnx_path"] is None and logged["no_onnx"] == register.ONNX_OFF and logged["run_id"] == "run-concat-1"
    assert logged["tags"]["onnx_export"] == "none" and logged["tags"]["onnx_reason"] == register.ONNX_OFF
    assert plan["config"]["onnx"] is False  # in the key: turning it back on registers again, with the export
    with pytest.raises(ValueError):
        register.Settings(metric="colorfulness_truth")


def test_the_version_says_which_hints_it_takes(tmp_path: Path) -> None:
    champion = register.decide(_evaluated(), _trained(tmp_path), "rgb_mse", "ssim")
    plain = register.description(champion, {"head": "regression"})
    assert plain.startswith(champion.description()) and "Takes no hints" in plain
    hinted = {"head": "regression", "hints": "local+global"}
    assert "--reference" in register.description(champion, hinted)
    assert register.version_tags(champion, hinted, {"attached": True})["hints"] == "local+global"
    assert "hints" not in register.version_tags(champion, {"head": "regression"}, {"attached": True})
