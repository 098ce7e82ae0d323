"""Register stage: pick the best variant by a configurable metric, log it as an MLflow pyfunc model with
its ONNX export when that export reproduces eager PyTorch (model/onnx_engine.py; without one otherwise,
tagged ``onnx_export=none`` with the reason), register it as ``colorizer`` and point the
``champion`` alias at it, with the evaluation table attached.

Selection is by the test-table metric (default RGB MSE, lower is better) with a second metric breaking
ties; a variant whose metric is not a finite number is never chosen. With several training seeds the
champion *variant* is chosen by its mean over seeds, and the model registered is that variant's best
seed by the same metric: the mean is the honest figure for the variant (tagged ``test_<metric>_mean``),
while the registered model is the best one trained (its own score is tagged too, and is optimistic by
selection). A variant that does not beat the grayscale baseline on the chosen metric is still registered
(the user asked for a champion), but the version is tagged ``beats_baseline=false`` and a warning says
so; whether the paired 95% interval against the baseline excludes zero is tagged beside it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from model.colorizer import MODEL_FILE, SPEC_FILE, load_trained
from model.metrics import BASELINE, COLUMNS, HIGHER_IS_BETTER, RANKABLE
from storage.atomic import write_bytes, write_json
from storage.code_identity import code_version
from storage.errors import disk_full
from storage.settings import Section
from storage.stage import SCRATCH, StageResult, finished, make_plan, run_stage
from storage.tracking import Tracker, flatten, retry_locked, tracking_uri

log = logging.getLogger(__name__)
STAGE = "register"
Metric = Literal[RANKABLE]  # type: ignore[valid-type]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Settings(Section):
    """The register section: how the champion is chosen, and the registry names it is given."""

    metric: Metric = "rgb_mse"
    tie_breaker: Metric = "ssim"
    model_name: str = Field("colorizer", description="registered model name")
    alias: str = Field("champion", description="alias pointed at the chosen version")

    @field_validator("model_name", "alias")
    @classmethod
    def _registry_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a usable registry name (letters, digits, '_', '-', '.'; no '/')")
        return v


def plan(s: Settings, evaluated: dict[str, Any], trained: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    inputs = {"evaluated": evaluated, "trained": trained}
    return make_plan(workdir, STAGE, inputs, s.for_stage(), code_version(__name__))


def plans(s: Settings, seed: int, inputs: Mapping[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """The flow's view (flows/dag.py): one plan over the evaluation and the trained models."""
    return {STAGE: plan(s, inputs["evaluate"], inputs["train"], workdir)}


def intact(plan: dict[str, Any]) -> bool:
    """A finished register stage is intact only if the registry still has the version its manifest
    names, with the model's files (a lost mlflow.db, or a moved work dir's stale locations, redo it)."""
    manifest = finished(plan)
    return manifest is not None and Tracker(Path(plan["workdir"])).version_intact(
        manifest["model_name"], manifest["alias"], manifest["version"]
    )


def choose(table: list[dict[str, Any]], metric: str, tie_breaker: str) -> dict[str, Any]:
    """Best row among the variants (never the baseline) by ``metric``, ties broken by ``tie_breaker``.
    Rows whose metric is NaN or infinite (a diverged model) are never chosen."""
    rows = [r for r in table if r["variant"] != BASELINE and math.isfinite(r[metric])]
    if not rows:
        raise ValueError(f"no variant has a finite value for {metric}; pick another register.metric")

    def key(row: dict[str, Any]) -> tuple[float, float]:
        def signed(m: str) -> float:
            v = row[m] if math.isfinite(row[m]) else math.inf
            return -v if HIGHER_IS_BETTER[m] and math.isfinite(row[m]) else v

        return (round(signed(metric), 12), signed(tie_breaker))

    return min(rows, key=key)


def beats_baseline(table: list[dict[str, Any]], row: dict[str, Any], metric: str) -> bool:
    base = next(r for r in table if r["variant"] == BASELINE)[metric]
    return row[metric] > base if HIGHER_IS_BETTER[metric] else row[metric] < base


def _recreate_run(tracker: Tracker, trained: dict[str, Any], row: dict[str, Any]) -> str:
    """A new MLflow run for a trained model whose original run no longer exists, holding what the train
    manifest recorded and its test metrics, so the registered version points at a real run."""
    variant = trained["variant"]
    tags = {"stage": STAGE, "variant": variant, "recreated_from": trained["mlflow_run_id"]}
    run_id = tracker.start_run(f"train-{variant}", tags=tags)
    tracker.log_params(run_id, {"variant": variant, "train_key": trained["key"], **flatten("train", trained["config"])})
    tracker.log_metrics(run_id, {f"test_{k}": v for k, v in row.items() if k in COLUMNS and math.isfinite(v)})
    log.warning(
        "the MLflow run of %s (%s) is gone; registering from a new run %s", variant, tags["recreated_from"], run_id
    )
    return run_id


def _model_spec(folder: Path, temperature: float | None, scratch: Path) -> tuple[Path, dict[str, Any]]:
    """The spec the version ships (path, content): the trained one, a classification model's default
    decoding set to the temperature it was evaluated at, so that what users get without ``--vividness``
    is what the registered test metrics describe."""
    spec = json.loads((folder / SPEC_FILE).read_text())
    if spec.get("head") == "classification" and temperature is not None:
        spec["temperature"] = temperature
    write_json(scratch / SPEC_FILE, spec)
    return scratch / SPEC_FILE, spec


def _try_onnx(folder: Path, spec: Path, scratch: Path) -> tuple[Path | None, dict[str, Any]]:
    """The champion's ONNX export and its check report, or ``(None, report with the reason)``: ONNX is an
    optional engine, so neither a failed parity check nor an exporter that raises (an operator it cannot
    handle) stops the registration; the torch engine serves that version. A full disk still does."""
    from model.onnx_engine import ONNX_FILE, ExportMismatch, export

    path = scratch / ONNX_FILE  # stored with the registered version, not in the stage folder
    try:
        return path, {"attached": True, **export(load_trained(spec, folder / MODEL_FILE), path)}
    except Exception as exc:  # noqa: BLE001 - any exporter failure leaves the torch engine, said once
        if disk_full(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = first if isinstance(exc, ExportMismatch) else f"the exporter failed: {type(exc).__name__}: {first}"
        log.warning("registering without an ONNX export (torch engine only): %s", reason)
        return None, {"attached": False, "reason": reason, **getattr(exc, "report", {})}


def run(plan: dict[str, Any], force: bool = False) -> StageResult:
    workdir = Path(plan["workdir"])
    r = Settings.model_validate(plan["config"])
    evaluated, trained = plan["inputs"]["evaluated"], plan["inputs"]["trained"]

    def work(out: Path) -> dict[str, Any]:
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

        from model import bundle, pyfunc  # imports mlflow: only when registering, not when composing settings

        table, variant_table = evaluated["table"], evaluated["variant_table"]
        best = choose(variant_table, r.metric, r.tie_breaker)
        model_row = choose([row for row in table if row["variant"] == best["variant"]], r.metric, r.tie_breaker)
        winner = next(t for t in trained if (t["variant"], t["seed"]) == (best["variant"], model_row["seed"]))
        wins = beats_baseline(variant_table, best, r.metric)
        interval = next(
            (
                c
                for c in evaluated["comparisons"]
                if (c["a"], c["b"], c["metric"]) == (best["variant"], BASELINE, r.metric)
            ),
            None,
        )
        significant = bool(interval and interval["significant"] and wins)
        if not wins:
            log.warning("the best variant (%s) does not beat the grayscale baseline on %s", best["variant"], r.metric)
        folder = Path(winner["folder"])
        uri = tracking_uri(workdir)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        size = winner["spec"]["image_size"]
        example = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        images = Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))])  # any batch, any photo size
        spec_path, spec = _model_spec(folder, evaluated.get("temperature"), out / SCRATCH)
        classifies = spec.get("head") == "classification"
        params = ParamSchema([ParamSpec(pyfunc.VIVIDNESS, "double", spec["temperature"])]) if classifies else None
        signature = ModelSignature(inputs=images, outputs=images, params=params)
        entry = out / SCRATCH / "colorizer_model.py"
        write_bytes(entry, pyfunc.ENTRY.encode())
        code_paths = bundle.stage_code(out / SCRATCH / "code")  # only what the model imports
        onnx_path, onnx_report = _try_onnx(folder, spec_path, out / SCRATCH)
        artifacts = {"weights": str(folder / MODEL_FILE), "spec": str(spec_path)}
        if onnx_path is not None:
            artifacts["onnx"] = str(onnx_path)
        tracker = Tracker(workdir)
        run_id = winner["mlflow_run_id"]
        if not tracker.run_exists(run_id):  # mlflow.db was lost or replaced: the cached training run is gone
            run_id = _recreate_run(tracker, winner, model_row)
        with mlflow.start_run(run_id=run_id):
            info = retry_locked(
                mlflow.pyfunc.log_model,
                name="colorizer",
                python_model=str(entry),  # models from code: nothing pickled
                artifacts=artifacts,
                code_paths=[str(p) for p in code_paths],
                signature=signature,
                input_example=example,
                pip_requirements=bundle.pip_requirements(),
                model_config={pyfunc.NO_ONNX: onnx_report["reason"]} if onnx_path is None else None,
            )
        version = retry_locked(mlflow.register_model, info.model_uri, r.model_name)
        client = tracker.client
        retry_locked(client.set_registered_model_alias, r.model_name, r.alias, version.version)
        summary = "\n".join(
            f"{row['variant']}: {r.metric}={row[r.metric]:.6g}"
            + (f" ± {row[r.metric + '_std']:.2g} over {row['n_seeds']} seeds" if row["n_seeds"] > 1 else "")
            for row in variant_table
        )
        retry_locked(
            client.update_model_version,
            r.model_name,
            version.version,
            description=f"Chosen by {r.metric} (tie-breaker {r.tie_breaker}, mean over seeds) on the test split; "
            f"this version is seed {winner['seed']}.\n{summary}",
        )
        for k, v in {
            "variant": best["variant"],
            "head": spec.get("head", "regression"),
            **({"vividness": spec["temperature"]} if classifies else {}),
            "seed": winner["seed"],
            "n_seeds": best["n_seeds"],
            "metric": r.metric,
            f"test_{r.metric}": model_row[r.metric],
            f"test_{r.metric}_mean": best[r.metric],
            "beats_baseline": wins,
            "beats_baseline_95ci": significant,
            "train_key": winner["key"],
            "evaluate_key": evaluated["key"],
            "onnx_export": "attached" if onnx_path is not None else "none",
            **({} if onnx_path is not None else {"onnx_reason": onnx_report["reason"]}),
        }.items():
            retry_locked(client.set_model_version_tag, r.model_name, version.version, k, str(v))
        write_bytes(out / "registered.txt", f"models:/{r.model_name}@{r.alias} -> version {version.version}\n".encode())
        return {
            "model_name": r.model_name,
            "alias": r.alias,
            "version": int(version.version),
            "variant": best["variant"],
            "head": spec.get("head", "regression"),
            **({"vividness": spec["temperature"]} if classifies else {}),
            "seed": winner["seed"],
            "n_seeds": best["n_seeds"],
            "metric": r.metric,
            "value": best[r.metric],
            "model_value": model_row[r.metric],
            "beats_baseline": wins,
            "beats_baseline_95ci": significant,
            "vs_baseline": interval,
            "model_uri": info.model_uri,
            "onnx": onnx_report,
        }

    return run_stage(plan, work, force=force)
