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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader

from model.colorizer import load_folder
from model.lab import lab_norm_to_rgb
from model.metrics import BASELINE, COLUMNS, Lpips, gray_baseline, image_metrics
from model.pretrained import locate
from model.preview import grid, save_png
from model.samples import decode_sample, first_batch
from storage.atomic import write_bytes, write_json
from storage.code_identity import code_version
from storage.settings import Section
from storage.shards import ShardDataset, shard_paths
from storage.stage import StageResult, make_plan, run_stage
from storage.tracking import Tracker

log = logging.getLogger(__name__)
STAGE = "evaluate"


class Settings(Section):
    """The evaluate section: which metrics, how many images in the grid, the scoring batch size."""

    lpips: bool = True
    grid_images: int = Field(8, ge=1, le=256)
    batch_size: int = Field(16, ge=1, le=4096)


def plan(s: Settings, prepared: dict[str, Any], trained: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Whether the LPIPS backbone is on disk decides whether LPIPS is scored, so it is a fact in the key."""
    facts = {"lpips_backbone_present": s.lpips and locate("alexnet", allow_download=False).available}
    inputs = {"prepared": prepared, "trained": trained}
    return make_plan(workdir, STAGE, inputs, s.for_stage(), code_version(__name__), facts)


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


def run(plan: dict[str, Any], force: bool = False, parent_run_id: str | None = None) -> StageResult:
    e = Settings.model_validate(plan["config"])
    prepared, trained = plan["inputs"]["prepared"], plan["inputs"]["trained"]

    def work(out: Path) -> dict[str, Any]:
        lpips = Lpips(e.lpips)
        if lpips.missing:
            log.warning("LPIPS will be reported as missing: %s", lpips.missing)
        table = [{"variant": BASELINE, **score(gray_baseline, prepared, lpips, e.batch_size)}]
        nets = {}
        for t in trained:
            net = nets[t["variant"]] = load_folder(t["folder"])
            table.append({"variant": t["variant"], **score(lambda x, n=net: n(x), prepared, lpips, e.batch_size)})
        l_norm, ab = first_batch(shard_paths(prepared, "test"), e.grid_images)
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
        tracker = Tracker(Path(plan["workdir"]))
        for t, row in zip(trained, table[1:], strict=True):
            metrics = {f"test_{k}": row[k] for k in COLUMNS if not math.isnan(row[k])}
            tracker.log_metrics(t["mlflow_run_id"], metrics)
            lpips_tag = row["lpips"] if lpips.missing is None else f"missing: {lpips.missing}"
            tracker.set_tags(t["mlflow_run_id"], {"test_lpips": lpips_tag})
        if parent_run_id:
            for name in ("metrics.md", "metrics.csv", "grid.png"):
                tracker.log_artifact(parent_run_id, out / name, "evaluation")
        log.info("test metrics:\n%s", md)
        return {"table": table, "lpips_missing": lpips.missing, "variants": [t["variant"] for t in trained]}

    return run_stage(plan, work, force=force)
