"""Evaluate stage: every trained model (variant x seed) and the grayscale baseline, on the test split,
by the same code, and the study over them.

RGB is rebuilt from the true L and the predicted ab (model.lab), so L is exact and PSNR/SSIM are high
for any prediction; the grayscale baseline (ab = 0) is the row to beat. Metrics are per image, then
averaged. Outputs: metrics.csv, metrics.md, metrics.json (one row per model + baseline, then per variant
mean +- std over seeds, then paired comparisons with 95% intervals: model.study), per_image.csv (every
model's score on every test image), study.png (the ranking metric per variant with error bars, and the
paired differences), grid.png (gray | each variant | truth on the same test images), and each model's
test metrics in its MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.utils.data import DataLoader

from model.choices import DEFAULT_VIVIDNESS, DEVICES, vividness_problem
from model.colorizer import load_folder
from model.inference import Vivid, resolve_device
from model.lab import lab_norm_to_rgb
from model.metrics import BASELINE, COLUMNS, HIGHER_IS_BETTER, RANKABLE, Lpips, batch_metrics, gray_baseline, ssim
from model.pretrained import locate
from model.preview import grid, save_png, save_study_plot
from model.samples import decode_sample, first_batch
from model.study import aggregate, compare_all
from storage.atomic import write_bytes, write_json
from storage.code_identity import code_version
from storage.errors import ConfigError
from storage.settings import Section
from storage.shards import ShardDataset, shard_paths
from storage.stage import StageResult, make_plan, run_stage
from storage.tracking import Tracker

log = logging.getLogger(__name__)
STAGE = "evaluate"
PLOTTED = ("rgb_mse", "colorfulness_gap")  # study.png: the two the study's targets are stated in


class Settings(Section):
    """The evaluate section: which metrics, how many images in the grid, the scoring batch size."""

    lpips: bool = True
    grid_images: int = Field(8, ge=1, le=256)
    batch_size: int = Field(16, ge=1, le=4096)
    device: Literal[DEVICES] = Field(  # type: ignore[valid-type]
        "auto", description="where the networks predict: auto (a GPU when visible), cpu or cuda"
    )
    temperature: float = Field(
        DEFAULT_VIVIDNESS,
        description="the annealed-mean temperature classification-head models are decoded at (1: the mean, "
        "lower: more vivid); the registered model's default vividness",
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        problem = vividness_problem(v)
        if problem:
            raise ValueError(problem)
        return v


def preflight(s: Settings) -> None:
    """``evaluate.device=cuda`` with no GPU visible: refused before any work, in one line."""
    try:
        resolve_device(s.device)
    except ValueError as exc:
        raise ConfigError(f"evaluate.device: {exc}") from None


def plan(s: Settings, prepared: dict[str, Any], trained: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Whether the LPIPS backbone is on disk decides whether LPIPS is scored, and the device the networks
    run on changes their last bits: both are facts in the key."""
    facts = {
        "lpips_backbone_present": s.lpips and locate("alexnet", allow_download=False).available,
        # not resolve_device(s.device): planning (the contract tests, a plan made for another machine) must
        # not need the GPU that `cuda` names; the flow's preflight refuses cuda without one
        "device": resolve_device("auto").type if s.device == "auto" else s.device,
    }
    inputs = {"prepared": prepared, "trained": trained}
    return make_plan(workdir, STAGE, inputs, s.for_stage(), code_version(__name__), facts)


def plans(s: Settings, seed: int, inputs: Mapping[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """The flow's view (flows/dag.py): one plan over the prepared test split and every trained model."""
    return {STAGE: plan(s, inputs["prepare"], inputs["train"], workdir)}


def score(
    predict: Any, prepared: dict[str, Any], lpips: Lpips, batch_size: int, device: torch.device | None = None
) -> tuple[dict[str, Any], list[dict]]:
    """(mean per-image metrics, the per-image rows) of ``predict(l_norm) -> ab_norm`` on the test split,
    images in file order: every model is scored on the same images in the same order (paired). The
    batch stays on ``device`` for the prediction, the Lab conversion, LPIPS and every metric but SSIM
    (scikit-image's, on the host)."""
    device = device or torch.device("cpu")
    rows: list[dict[str, float]] = []
    loader = DataLoader(ShardDataset(shard_paths(prepared, "test"), decode_sample), batch_size=batch_size)
    with torch.no_grad():
        for l_cpu, ab_cpu in loader:
            l_norm, ab = l_cpu.to(device), ab_cpu.to(device)
            pred = predict(l_norm).float()
            true_rgb, pred_rgb = lab_norm_to_rgb(l_norm, ab), lab_norm_to_rgb(l_norm, pred)
            lp = lpips(true_rgb, pred_rgb)
            batch = batch_metrics(true_rgb, pred_rgb, ab, pred)
            true_np, pred_np = (x.permute(0, 2, 3, 1).double().cpu().numpy() for x in (true_rgb, pred_rgb))
            batch["ssim"] = [ssim(t, p) for t, p in zip(true_np, pred_np, strict=True)]
            batch["lpips"] = lp if lp is not None else [math.nan] * len(ab)
            rows += [{k: batch[k][i] for k in COLUMNS} for i in range(len(ab))]
    if not rows:
        raise ValueError("the test split is empty: nothing to evaluate")
    means = {k: float(np.mean([r[k] for r in rows])) for k in COLUMNS}
    means["n_images"] = len(rows)
    return means, rows


def _fmt(v: float | str) -> str:
    if isinstance(v, str):
        return v
    return "missing" if math.isnan(v) else f"{v:.5f}" if abs(v) < 1 else f"{v:.3f}"


def markdown(table: list[dict[str, Any]], lpips_missing: str | None, temperature: float | None = None) -> str:
    head = ["variant", "seed", *COLUMNS, "n_images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        seed = "" if row.get("seed") is None else str(row["seed"])
        cells = [row["variant"], seed, *(_fmt(row[c]) for c in COLUMNS), str(row["n_images"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "RGB rebuilt from the true L and the predicted ab; PSNR over the whole RGB image in [0,1]; SSIM as "
        "Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, population covariances, data range 1; "
        "ab_mse in normalized units (ab/110); colourfulness: Hasler & Suesstrunk (2003), "
        "gap = |pred - truth| per image; ab_hist: intersection of the ab histograms (10x10 cells) with the truth's.",
    ]
    if any(row.get("head") == "classification" for row in table):
        notes.append(f"Classification-head models decoded by the annealed mean at T = {temperature:g}.")
    if lpips_missing:
        notes.append(f"LPIPS missing: {lpips_missing}")
    return "\n".join(lines + notes) + "\n"


def study_markdown(variant_table: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> str:
    """Per variant mean +- std over seeds, then every paired comparison with its interval."""
    head = ["variant", "seeds", *RANKABLE]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in variant_table:
        cells = [
            _fmt(row[m]) + ("" if row["n_seeds"] < 2 or math.isnan(row[m]) else f" ± {_fmt(row[m + '_std'])}")
            for m in RANKABLE
        ]
        lines.append("| " + " | ".join([row["variant"], str(row["n_seeds"]), *cells]) + " |")
    lines += [
        "",
        "| A - B | metric | mean difference | 95% interval | Wilcoxon p | significant |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        interval = f"[{c['ci_low']:+.5g}, {c['ci_high']:+.5g}]"
        better = "" if not c["significant"] else f" ({_better(c)} better)"
        lines.append(
            f"| {c['a']} - {c['b']} | {c['metric']} | {c['mean_diff']:+.5g} | {interval} | {c['p_wilcoxon']:.3g} "
            f"| {'yes' if c['significant'] else 'no'}{better} |"
        )
    lines += [
        "",
        "Paired by test image. Interval: two-level bootstrap (test images and each variant's training seeds "
        "resampled, 10,000 replicates); significant when it excludes 0. Wilcoxon signed-rank over the "
        "seed-averaged images, as a second opinion that ignores seed noise.",
    ]
    return "\n".join(lines) + "\n"


def _seed_mean(per_seed: dict[Any, list[float]]) -> list[float]:
    return np.mean(np.array(list(per_seed.values()), dtype=np.float64), axis=0).tolist()


def _better(c: dict[str, Any]) -> str:
    a_higher = c["mean_diff"] > 0
    return c["a"] if a_higher == HIGHER_IS_BETTER[c["metric"]] else c["b"]


def model_label(t: dict[str, Any], multi_seed: bool) -> str:
    return f"{t['variant']}-seed{t['seed']}" if multi_seed else t["variant"]


def _study(
    trained: list[dict[str, Any]], per_image: dict[str, dict[str, dict[Any, list[float]]]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per variant mean +- std over seeds with the baseline first, paired comparisons)."""
    variants = list(dict.fromkeys(t["variant"] for t in trained))
    rows = []
    for variant in [BASELINE, *variants]:
        row: dict[str, Any] = {"variant": variant}
        for metric in COLUMNS:
            agg = aggregate(per_image[metric][variant], variant, metric)
            row[metric], row[f"{metric}_std"] = agg.mean, agg.std
            row.setdefault("per_seed", {})[metric] = list(agg.per_seed.values())
        row["n_seeds"] = 0 if variant == BASELINE else len(per_image[COLUMNS[0]][variant])
        row["seeds"] = [] if variant == BASELINE else sorted(per_image[COLUMNS[0]][variant])
        rows.append(row)
    comparisons = [c.as_dict() for c in compare_all(per_image, variants, BASELINE, RANKABLE)]
    return rows, comparisons


def run(plan: dict[str, Any], force: bool = False, parent_run_id: str | None = None) -> StageResult:
    e = Settings.model_validate(plan["config"])
    prepared, trained = plan["inputs"]["prepared"], plan["inputs"]["trained"]

    def work(out: Path) -> dict[str, Any]:
        lpips = Lpips(e.lpips)
        if lpips.missing:
            log.warning("LPIPS will be reported as missing: %s", lpips.missing)
        device = torch.device(plan["facts"]["device"])
        means, rows = score(gray_baseline, prepared, lpips, e.batch_size, device)
        table = [{"variant": BASELINE, "seed": None, **means}]
        per_image = {m: {BASELINE: {None: [r[m] for r in rows]}} for m in COLUMNS}
        per_image_rows = [{"model": BASELINE, "image": i, **r} for i, r in enumerate(rows)]
        multi_seed = len({t["seed"] for t in trained}) > 1
        first: dict[str, torch.nn.Module] = {}  # each variant's lowest-seed model, for the picture grid
        for t in sorted(trained, key=lambda t: (t["variant"], t["seed"])):
            net = load_folder(t["folder"]).to(device)
            net = Vivid(net, e.temperature) if net.classifies else net  # the decoding; regression has none
            first.setdefault(t["variant"], net)
            means, rows = score(net, prepared, lpips, e.batch_size, device)
            table.append({"variant": t["variant"], "seed": t["seed"], "head": net.spec.head, **means})
            for m in COLUMNS:
                per_image[m].setdefault(t["variant"], {})[t["seed"]] = [r[m] for r in rows]
            label = model_label(t, multi_seed)
            per_image_rows += [{"model": label, "image": i, **r} for i, r in enumerate(rows)]
        variant_table, comparisons = _study(trained, per_image)

        variants = list(dict.fromkeys(t["variant"] for t in trained))
        l_norm, ab = first_batch(shard_paths(prepared, "test"), e.grid_images)
        with torch.no_grad():
            cols = [first[v](l_norm.to(device)).float().cpu() for v in variants]
        save_png(grid(l_norm, [*cols, ab]), out / "grid.png")
        diffs = {
            (c["metric"], c["a"], c["b"]): np.subtract(
                _seed_mean(per_image[c["metric"]][c["a"]]), _seed_mean(per_image[c["metric"]][c["b"]])
            ).tolist()
            for c in comparisons
            if c["metric"] in PLOTTED
        }
        save_study_plot(variant_table, comparisons, diffs, PLOTTED, out / "study.png")
        import pandas as pd

        frame = pd.DataFrame(table)
        write_bytes(out / "metrics.csv", frame.to_csv(index=False).encode())
        write_bytes(out / "per_image.csv", pd.DataFrame(per_image_rows).to_csv(index=False).encode())
        md = markdown(table, lpips.missing, e.temperature) + "\n" + study_markdown(variant_table, comparisons)
        write_bytes(out / "metrics.md", md.encode())
        write_json(
            out / "metrics.json",
            {
                "rows": json.loads(frame.to_json(orient="records")),
                "variants": variant_table,
                "comparisons": comparisons,
                "lpips_missing": lpips.missing,
                "grid_columns": ["gray", *variants, "truth"],
            },
        )
        tracker = Tracker(Path(plan["workdir"]))
        for row in table[1:]:
            t = next(t for t in trained if (t["variant"], t["seed"]) == (row["variant"], row["seed"]))
            metrics = {f"test_{k}": row[k] for k in COLUMNS if not math.isnan(row[k])}
            tracker.log_metrics(t["mlflow_run_id"], metrics)
            lpips_tag = row["lpips"] if lpips.missing is None else f"missing: {lpips.missing}"
            tracker.set_tags(t["mlflow_run_id"], {"test_lpips": lpips_tag})
        if parent_run_id:
            for name in ("metrics.md", "metrics.csv", "per_image.csv", "grid.png", "study.png"):
                tracker.log_artifact(parent_run_id, out / name, "evaluation")
        log.info("test metrics:\n%s", md)
        return {
            "table": table,
            "variant_table": variant_table,
            "comparisons": comparisons,
            "lpips_missing": lpips.missing,
            "variants": variants,
            "temperature": e.temperature,
        }

    return run_stage(plan, work, force=force)
