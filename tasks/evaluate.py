"""Evaluate stage: every trained model (variant x seed) and the grayscale baseline, on the test split,
by the same code, and the study over them.

RGB is rebuilt from the true L and the predicted ab (model.lab), so L is exact and PSNR/SSIM are high
for any prediction; the grayscale baseline (ab = 0) is the row to beat. Metrics are per image, then
averaged. Outputs: metrics.csv, metrics.md, metrics.json (one row per model + baseline, then per variant
mean +- std over seeds, then paired comparisons with 95% intervals: model.study), per_image.csv (every
model's score on every test image), study.png (the ranking metric per variant with error bars, and the
paired differences), grid.png (gray | each variant | truth on the same test images), and each model's
test metrics in its MLflow run.

What the stage finds is a value: :func:`score` gives each model's per-image scores, :func:`evaluation`
turns them into an :class:`Evaluation` (the table, the per-image scores, the study), which writes its
files itself; :func:`log_evaluation` is the one place the stage speaks to MLflow. The metrics are
model.metrics' table's: a metric added there is a column here, and a study comparison if it ranks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.choices import DEFAULT_VIVIDNESS
from model.colorizer import load_folder
from model.inference import Vivid, resolve_device
from model.lab import lab_norm_to_rgb
from model.metrics import BASELINE, COLUMNS, HIGHER_IS_BETTER, METRICS, RANKABLE, Lpips, batch_metrics, gray_baseline
from model.pretrained import locate
from model.preview import grid, save_png, save_study_plot
from model.samples import decode_sample, first_batch
from model.study import aggregate, compare_all
from storage.atomic import write_bytes, write_json
from storage.code_identity import code_version
from storage.errors import ConfigError
from storage.shards import ShardDataset, shard_paths
from storage.stage import StageResult, make_plan, run_stage
from storage.tracking import Tracker
from tasks.evaluate_hints import HintCurve, hint_curve, save_grid, save_plot, score_conditions, takes_hints
from tasks.settings.evaluate import Settings

log = logging.getLogger(__name__)
STAGE = "evaluate"
PLOTTED = ("rgb_mse", "colorfulness_gap")  # study.png: the two the study's targets are stated in


def preflight(s: Settings) -> None:
    """``evaluate.device=cuda`` with no GPU visible: refused before any work, in one line."""
    try:
        resolve_device(s.device)
    except ValueError as exc:
        raise ConfigError(f"evaluate.device: {exc}") from None


def decodes(trained: Mapping[str, Any]) -> bool:
    """Whether a train manifest's model is decoded at ``evaluate.temperature``: a classification head (or
    a manifest that does not say which head, to be safe). A regression head predicts ab directly."""
    spec = trained.get("spec")
    return spec is None or spec.get("head", "regression") == "classification"


def plan(s: Settings, prepared: dict[str, Any], trained: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Whether the LPIPS backbone is on disk decides whether LPIPS is scored, and the device the networks
    run on changes their last bits: both are facts in the key. ``evaluate.temperature`` is in the key
    only when a model it decodes is evaluated: on regression heads alone it changes nothing, so setting
    it neither reruns the stage nor registers a duplicate version (a warning says it is ignored). The
    hint curve's settings likewise, only when a model takes hints."""
    config = s.for_stage()
    if not any(decodes(t) for t in trained):
        del config["temperature"]
        if s.temperature != DEFAULT_VIVIDNESS:
            log.warning(
                "evaluate.temperature=%g is ignored: it decodes classification-head models, and every model "
                "evaluated here has a regression head",
                s.temperature,
            )
    if not any(takes_hints(t) for t in trained):  # the hint curve scores only models that take hints
        del config["hint_points"], config["hint_seed"]
    facts = {
        "lpips_backbone_present": s.lpips and locate("alexnet", allow_download=False).available,
        # not resolve_device(s.device): planning (the contract tests, a plan made for another machine) must
        # not need the GPU that `cuda` names; the flow's preflight refuses cuda without one
        "device": resolve_device("auto").type if s.device == "auto" else s.device,
    }
    inputs = {"prepared": prepared, "trained": trained}
    return make_plan(workdir, STAGE, inputs, config, code_version(__name__), facts)


def plans(s: Settings, seed: int, inputs: Mapping[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """The flow's view (flows/dag.py): one plan over the prepared test split and every trained model."""
    return {STAGE: plan(s, inputs["prepare"], inputs["train"], workdir)}


@dataclass(frozen=True)
class Scored:
    """One model's scores on the test split (:func:`score`): the per-image rows (every column of
    model.metrics' table, images in file order) and their means (plus ``n_images``); ``head``: the
    model's (None: the baseline, which has none)."""

    means: dict[str, Any]
    rows: list[dict[str, float]]
    head: str | None = None

    def column(self, metric: str) -> list[float]:
        return [r[metric] for r in self.rows]


Hints = Callable[[torch.Tensor, int], dict[str, torch.Tensor]]  # (true ab, first image's index) -> hint inputs


def score(
    predict: Any,
    prepared: dict[str, Any],
    lpips: Lpips,
    batch_size: int,
    device: torch.device | None = None,
    hints: Hints | None = None,
) -> Scored:
    """The scores of ``predict(l_norm) -> ab_norm`` on the test split, images in file order: every model
    is scored on the same images in the same order (paired). The batch stays on ``device`` for the
    prediction, the Lab conversion, LPIPS and every metric but SSIM (scikit-image's, on the host).
    ``hints``: the hint inputs ``predict`` is given with each batch, made from its truth (the hint curve)."""
    device = device or torch.device("cpu")
    rows: list[dict[str, float]] = []
    loader = DataLoader(ShardDataset(shard_paths(prepared, "test"), decode_sample), batch_size=batch_size)
    with torch.no_grad():
        for l_cpu, ab_cpu in loader:
            l_norm, ab = l_cpu.to(device), ab_cpu.to(device)
            pred = (predict(l_norm, **hints(ab, len(rows))) if hints else predict(l_norm)).float()
            true_rgb, pred_rgb = lab_norm_to_rgb(l_norm, ab), lab_norm_to_rgb(l_norm, pred)
            batch = batch_metrics(true_rgb, pred_rgb, ab, pred, lpips)
            rows += [{k: batch[k][i] for k in COLUMNS} for i in range(len(ab))]
    if not rows:
        raise ValueError("the test split is empty: nothing to evaluate")
    means: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in COLUMNS}
    means["n_images"] = len(rows)
    return Scored(means, rows)


def markdown(table: list[dict[str, Any]], lpips_missing: str | None, temperature: float | None = None) -> str:
    head = ["variant", "seed", *(METRICS[c].header for c in COLUMNS), "n_images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        seed = "" if row.get("seed") is None else str(row["seed"])
        cells = [row["variant"], seed, *(METRICS[c].cell(row[c]) for c in COLUMNS), str(row["n_images"])]
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
    head = ["variant", "seeds", *(METRICS[m].header for m in RANKABLE)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in variant_table:
        cells = [
            METRICS[m].cell(row[m])
            + ("" if row["n_seeds"] < 2 or math.isnan(row[m]) else f" ± {METRICS[m].cell(row[m + '_std'])}")
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
            f"| {c['a']} - {c['b']} | {METRICS[c['metric']].header} | {c['mean_diff']:+.5g} | {interval} "
            f"| {c['p_wilcoxon']:.3g} | {'yes' if c['significant'] else 'no'}{better} |"
        )
    lines += [
        "",
        "Paired by test image. Interval: two-level bootstrap (test images and each variant's training seeds "
        "resampled, 10,000 replicates); significant when it excludes 0. Wilcoxon signed-rank over the "
        "seed-averaged images, as a second opinion that ignores seed noise.",
    ]
    return "\n".join(lines) + "\n"


def _seed_mean(per_seed: Mapping[Any, list[float]]) -> list[float]:
    return np.mean(np.array(list(per_seed.values()), dtype=np.float64), axis=0).tolist()


def _better(c: dict[str, Any]) -> str:
    a_higher = c["mean_diff"] > 0
    return c["a"] if a_higher == HIGHER_IS_BETTER[c["metric"]] else c["b"]


def model_label(t: dict[str, Any], multi_seed: bool) -> str:
    return f"{t['variant']}-seed{t['seed']}" if multi_seed else t["variant"]


PerImage = dict[str, dict[str, dict[Any, list[float]]]]  # metric -> variant -> seed -> one value per test image


@dataclass(frozen=True)
class Evaluation:
    """What the evaluate stage found, as plain values (no MLflow, no files): the table (one row per model,
    the baseline first, then by variant and seed: each metric's mean over the test images), the per-image
    scores (``per_image[metric][variant][seed]``, and as rows for per_image.csv), the study (per variant
    mean +- std over seeds, paired comparisons with intervals: model.study), why LPIPS is missing if it
    is, and the temperature classification heads were decoded at (None: no model was). ``variants``: in
    the trained models' order (the grid's columns, the comparisons' pairs)."""

    table: list[dict[str, Any]]
    per_image: PerImage
    per_image_rows: list[dict[str, Any]]
    variant_table: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    variants: list[str]
    lpips_missing: str | None
    temperature: float | None

    def markdown(self) -> str:
        """metrics.md: the table, then the study."""
        table = markdown(self.table, self.lpips_missing, self.temperature)
        return table + "\n" + study_markdown(self.variant_table, self.comparisons)

    def plot_diffs(self, metrics: Sequence[str] = PLOTTED) -> dict[tuple[str, str, str], list[float]]:
        """study.png's right column: each plotted comparison's per-image differences (seed-averaged)."""
        return {
            (c["metric"], c["a"], c["b"]): np.subtract(
                _seed_mean(self.per_image[c["metric"]][c["a"]]), _seed_mean(self.per_image[c["metric"]][c["b"]])
            ).tolist()
            for c in self.comparisons
            if c["metric"] in metrics
        }

    def test_metrics(self) -> list[tuple[tuple[str, int], dict[str, float], dict[str, Any]]]:
        """What each model's MLflow run is given: ((variant, seed), ``test_<metric>`` of every metric it
        has a number for, the ``test_lpips`` tag: its score, or why it is missing)."""
        out = []
        for row in self.table[1:]:
            metrics = {f"test_{k}": row[k] for k in COLUMNS if not math.isnan(row[k])}
            lpips_tag = row["lpips"] if self.lpips_missing is None else f"missing: {self.lpips_missing}"
            out.append(((row["variant"], row["seed"]), metrics, {"test_lpips": lpips_tag}))
        return out

    def manifest(self) -> dict[str, Any]:
        """The stage's manifest fields (what register reads)."""
        return {
            "table": self.table,
            "variant_table": self.variant_table,
            "comparisons": self.comparisons,
            "lpips_missing": self.lpips_missing,
            "variants": self.variants,
            "temperature": self.temperature,
        }

    def write(self, out: Path) -> None:
        """metrics.csv, per_image.csv, metrics.md and metrics.json into ``out``."""
        import pandas as pd

        frame = pd.DataFrame(self.table)
        write_bytes(out / "metrics.csv", frame.to_csv(index=False).encode())
        write_bytes(out / "per_image.csv", pd.DataFrame(self.per_image_rows).to_csv(index=False).encode())
        write_bytes(out / "metrics.md", self.markdown().encode())
        write_json(
            out / "metrics.json",
            {
                "rows": json.loads(frame.to_json(orient="records")),
                "variants": self.variant_table,
                "comparisons": self.comparisons,
                "lpips_missing": self.lpips_missing,
                "grid_columns": ["gray", *self.variants, "truth"],
            },
        )


def evaluation(
    trained: Sequence[dict[str, Any]],
    baseline: Scored,
    scores: Mapping[tuple[str, int], Scored],
    lpips_missing: str | None,
    temperature: float | None,
) -> Evaluation:
    """The evaluation from every model's scores: ``trained`` are the train manifests (only ``variant`` and
    ``seed`` are read) in the plan's order, ``scores[(variant, seed)]`` each one's."""
    table = [{"variant": BASELINE, "seed": None, **baseline.means}]
    per_image: PerImage = {m: {BASELINE: {None: baseline.column(m)}} for m in COLUMNS}
    per_image_rows = [{"model": BASELINE, "image": i, **r} for i, r in enumerate(baseline.rows)]
    multi_seed = len({t["seed"] for t in trained}) > 1
    for t in sorted(trained, key=lambda t: (t["variant"], t["seed"])):
        s = scores[(t["variant"], t["seed"])]
        table.append({"variant": t["variant"], "seed": t["seed"], "head": s.head, **s.means})
        for m in COLUMNS:
            per_image[m].setdefault(t["variant"], {})[t["seed"]] = s.column(m)
        label = model_label(t, multi_seed)
        per_image_rows += [{"model": label, "image": i, **r} for i, r in enumerate(s.rows)]
    variants = list(dict.fromkeys(t["variant"] for t in trained))
    variant_table, comparisons = _study(variants, per_image)
    return Evaluation(
        table, per_image, per_image_rows, variant_table, comparisons, variants, lpips_missing, temperature
    )


def _study(variants: list[str], per_image: PerImage) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per variant mean +- std over seeds with the baseline first, paired comparisons)."""
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


def log_evaluation(
    tracker: Tracker,
    ev: Evaluation,
    trained: Sequence[dict[str, Any]],
    out: Path,
    parent_run_id: str | None,
    curve: HintCurve | None = None,
) -> None:
    """The MLflow side, and nothing else: each model's test metrics (and LPIPS tag) and hint curve into
    its training run, the tables and pictures into the pipeline's run."""
    run_ids = {(t["variant"], t["seed"]): t["mlflow_run_id"] for t in trained}
    for model, metrics, tags in ev.test_metrics():
        tracker.log_metrics(run_ids[model], metrics)
        tracker.set_tags(run_ids[model], tags)
    for model, metrics in curve.test_metrics() if curve else ():
        tracker.log_metrics(run_ids[model], metrics)
    if parent_run_id:
        names = ["metrics.md", "metrics.csv", "per_image.csv", "grid.png", "study.png"]
        for name in names + (["hints.md", "hints.csv", "hints.png", "hints_grid.png"] if curve else []):
            tracker.log_artifact(parent_run_id, out / name, "evaluation")


def run(plan: dict[str, Any], force: bool = False, parent_run_id: str | None = None) -> StageResult:
    e = Settings.model_validate(plan["config"])
    prepared, trained = plan["inputs"]["prepared"], plan["inputs"]["trained"]
    temperature = e.temperature if "temperature" in plan["config"] else None  # None: no model decodes

    def work(out: Path) -> dict[str, Any]:
        lpips = Lpips(e.lpips)
        if lpips.missing:
            log.warning("LPIPS will be reported as missing: %s", lpips.missing)
        device = torch.device(plan["facts"]["device"])
        baseline = score(gray_baseline, prepared, lpips, e.batch_size, device)
        scores: dict[tuple[str, int], Scored] = {}
        first: dict[str, torch.nn.Module] = {}  # each variant's lowest-seed model, for the picture grid
        hinted: dict[tuple[str, int], Any] = {}  # the models that take hints: scored again on the hint curve

        def rescore(net: Any, hints: Any) -> Scored:
            return score(net, prepared, lpips, e.batch_size, device, hints=hints)

        for t in sorted(trained, key=lambda t: (t["variant"], t["seed"])):
            net = load_folder(t["folder"]).to(device)
            if net.classifies:  # the decoding; regression has none
                if temperature is None:
                    raise ValueError(f"{t['folder']}: a classification-head model its train manifest calls regression")
                net = Vivid(net, temperature)
            first.setdefault(t["variant"], net)
            if net.spec.hints != "off":
                hinted[(t["variant"], t["seed"])] = net
            scores[(t["variant"], t["seed"])] = replace(
                score(net, prepared, lpips, e.batch_size, device), head=net.spec.head
            )
        ev = evaluation(trained, baseline, scores, lpips.missing, temperature)
        l_norm, ab = first_batch(shard_paths(prepared, "test"), e.grid_images)  # grid.png's (and hints_grid.png's)
        curve = None
        if hinted:
            curve = hint_curve(
                {m: score_conditions(net, scores[m], rescore, e.hint_points, e.hint_seed) for m, net in hinted.items()},
                lpips.missing,
            )
            curve.write(out)
            save_plot(curve, baseline.means, out / "hints.png")
            save_grid(hinted[min(hinted)], l_norm, ab, e.hint_seed, out / "hints_grid.png")

        with torch.no_grad():
            cols = [first[v](l_norm.to(device)).float().cpu() for v in ev.variants]
        save_png(grid(l_norm, [*cols, ab]), out / "grid.png")
        save_study_plot(ev.variant_table, ev.comparisons, ev.plot_diffs(), PLOTTED, out / "study.png")
        ev.write(out)
        log_evaluation(Tracker(Path(plan["workdir"])), ev, trained, out, parent_run_id, curve)
        log.info("test metrics:\n%s", ev.markdown())
        if curve is None:
            return ev.manifest()
        log.info("hint curve:\n%s", curve.markdown())
        return {**ev.manifest(), "hint_curve": curve.rows}

    return run_stage(plan, work, force=force)
