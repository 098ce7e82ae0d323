"""Evaluate stage: every trained variant and the grayscale baseline, on the test split, by the same code.

RGB is rebuilt from the true L and the predicted ab (model.lab), so L is exact and PSNR/SSIM are high
for any prediction; the grayscale baseline (ab = 0) is the row to beat. Metrics are per image, then
averaged. Outputs: metrics.csv, metrics.md, metrics.json (one row per variant + baseline), grid.png
(the same test images for every variant), and each variant's test metrics in its MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import model.inference
import model.lab
import model.metrics
from flows.config import PipelineConfig
from model.lab import lab_norm_to_rgb
from model.metrics import Lpips, image_metrics
from model.preview import grid, save_png
from storage import tracking
from storage.atomic import write_bytes, write_json
from storage.shards import ShardDataset, shard_paths
from storage.stage import StageResult, code_version, make_plan, run_stage
from tasks.prepare import decode_sample
from tasks.train import load_model, preview_batch

log = logging.getLogger(__name__)
BASELINE = "grayscale baseline"
COLUMNS = ("ab_mse", "rgb_mse", "psnr", "ssim", "lpips", "colorfulness", "colorfulness_truth", "colorfulness_gap")


def plan_evaluate(
    cfg: PipelineConfig, prepared: dict[str, Any], trained: list[dict[str, Any]], workdir: Path
) -> dict[str, Any]:
    from model.pretrained import locate

    lpips_ready = cfg.evaluate.lpips and locate("alexnet", allow_download=False).available
    config = {**cfg.evaluate.model_dump(), "lpips_backbone_present": lpips_ready}
    code = code_version(sys.modules[__name__], model.metrics, model.lab, model.inference)
    return make_plan(workdir, "evaluate", [prepared, *trained], config, code)


def gray_baseline(l_norm: torch.Tensor) -> torch.Tensor:
    """The prediction 'no colour at all': ab = 0 for every pixel."""
    return torch.zeros(l_norm.shape[0], 2, *l_norm.shape[2:], dtype=l_norm.dtype)


def score(predict: Any, prepared: dict[str, Any], lpips: Lpips, batch_size: int) -> dict[str, Any]:
    """Average per-image metrics of ``predict(l_norm) -> ab_norm`` over the test split."""
    rows: list[dict[str, float]] = []
    loader = DataLoader(ShardDataset(shard_paths(prepared, "test"), decode_sample), batch_size=batch_size)
    with torch.no_grad():
        for l_norm, ab in loader:
            pred = predict(l_norm)
            true_rgb, pred_rgb = lab_norm_to_rgb(l_norm, ab), lab_norm_to_rgb(l_norm, pred)
            lp = lpips(true_rgb, pred_rgb)
            for i in range(len(ab)):
                row = image_metrics(
                    true_rgb[i].permute(1, 2, 0).double().numpy(),
                    pred_rgb[i].permute(1, 2, 0).double().numpy(),
                    ab[i].numpy(),
                    pred[i].numpy(),
                )
                row["lpips"] = lp[i] if lp is not None else math.nan
                rows.append(row)
    if not rows:
        raise ValueError("the test split is empty: nothing to evaluate")
    means = {k: float(np.mean([r[k] for r in rows])) for k in COLUMNS}
    means["n_images"] = len(rows)
    return means


def _fmt(v: float | str) -> str:
    if isinstance(v, str):
        return v
    return "missing" if math.isnan(v) else f"{v:.5f}" if abs(v) < 1 else f"{v:.3f}"


def markdown(table: list[dict[str, Any]], lpips_missing: str | None) -> str:
    head = ["variant", *COLUMNS, "n_images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        lines.append("| " + " | ".join([row["variant"], *(_fmt(row[c]) for c in COLUMNS), str(row["n_images"])]) + " |")
    notes = [
        "",
        "RGB rebuilt from the true L and the predicted ab; PSNR/SSIM with data_range=1.0 on RGB in [0,1]; "
        "ab_mse in normalized units (ab/110); colourfulness: Hasler & Suesstrunk (2003), "
        "gap = |pred - truth| per image.",
    ]
    if lpips_missing:
        notes.append(f"LPIPS missing: {lpips_missing}")
    return "\n".join(lines + notes) + "\n"


def run_evaluate(
    plan: dict[str, Any],
    cfg: PipelineConfig,
    prepared: dict[str, Any],
    trained: list[dict[str, Any]],
    parent_run_id: str | None = None,
    force: bool = False,
) -> StageResult:
    workdir = Path(plan["workdir"])
    e = cfg.evaluate

    def work(out: Path) -> dict[str, Any]:
        lpips = Lpips(e.lpips)
        if lpips.missing:
            log.warning("LPIPS will be reported as missing: %s", lpips.missing)
        table = [{"variant": BASELINE, **score(gray_baseline, prepared, lpips, e.batch_size)}]
        nets = {}
        for t in trained:
            net = nets[t["variant"]] = load_model(Path(t["folder"]))
            table.append({"variant": t["variant"], **score(lambda x, n=net: n(x), prepared, lpips, e.batch_size)})
        l_norm, ab = preview_batch(prepared, "test", e.grid_images)
        with torch.no_grad():
            cols = [nets[t["variant"]](l_norm) for t in trained]
        save_png(grid(l_norm, [*cols, ab]), out / "grid.png")
        import pandas as pd

        frame = pd.DataFrame(table)
        write_bytes(out / "metrics.csv", frame.to_csv(index=False).encode())
        md = markdown(table, lpips.missing)
        write_bytes(out / "metrics.md", md.encode())
        write_json(
            out / "metrics.json",
            {
                "rows": json.loads(frame.to_json(orient="records")),
                "lpips_missing": lpips.missing,
                "grid_columns": ["gray", *[t["variant"] for t in trained], "truth"],
            },
        )
        for t, row in zip(trained, table[1:], strict=True):
            metrics = {f"test_{k}": row[k] for k in COLUMNS if not math.isnan(row[k])}
            tracking.log_metrics(workdir, t["mlflow_run_id"], metrics)
            tracking.set_tags(
                workdir,
                t["mlflow_run_id"],
                {"test_lpips": row["lpips"] if lpips.missing is None else f"missing: {lpips.missing}"},
            )
        if parent_run_id:
            for name in ("metrics.md", "metrics.csv", "grid.png"):
                tracking.log_artifact(workdir, parent_run_id, out / name, "evaluation")
        log.info("test metrics:\n%s", md)
        return {"table": table, "lpips_missing": lpips.missing, "variants": [t["variant"] for t in trained]}

    return run_stage(plan, work, force=force)
