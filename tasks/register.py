"""Register stage: pick the best variant by a configurable metric, log it as an MLflow pyfunc model,
register it as ``colorizer`` and point the ``champion`` alias at it, with the evaluation table attached.

Selection is by the test-table metric (default RGB MSE, lower is better) with a second metric breaking
ties; a variant that does not beat the grayscale baseline on the chosen metric is still registered
(the user asked for a champion), but the version is tagged ``beats_baseline=false`` and a warning says so.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

import model.pyfunc
from flows.config import PipelineConfig
from model.metrics import HIGHER_IS_BETTER
from storage import tracking
from storage.atomic import write_bytes
from storage.stage import StageResult, code_version, make_plan, run_stage
from tasks.evaluate import BASELINE
from tasks.train import MODEL_FILE, SPEC_FILE

log = logging.getLogger(__name__)
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "numpy", "pillow", "mlflow==3.17.2"]


def plan_register(
    cfg: PipelineConfig, evaluated: dict[str, Any], trained: list[dict[str, Any]], workdir: Path
) -> dict[str, Any]:
    code = code_version(sys.modules[__name__], model.pyfunc)
    return make_plan(workdir, "register", [evaluated, *trained], {"seed": cfg.seed, **cfg.register.model_dump()}, code)


def choose(table: list[dict[str, Any]], metric: str, tie_breaker: str) -> dict[str, Any]:
    """Best row among the variants (never the baseline) by ``metric``, ties broken by ``tie_breaker``."""
    rows = [r for r in table if r["variant"] != BASELINE and not math.isnan(r[metric])]
    if not rows:
        raise ValueError(f"no variant has a value for {metric}; pick another register.metric")

    def key(row: dict[str, Any]) -> tuple[float, float]:
        def signed(m: str) -> float:
            v = row[m] if not math.isnan(row[m]) else math.inf
            return -v if HIGHER_IS_BETTER[m] else v

        return (round(signed(metric), 12), signed(tie_breaker))

    return min(rows, key=key)


def beats_baseline(table: list[dict[str, Any]], row: dict[str, Any], metric: str) -> bool:
    base = next(r for r in table if r["variant"] == BASELINE)[metric]
    return row[metric] > base if HIGHER_IS_BETTER[metric] else row[metric] < base


def run_register(
    plan: dict[str, Any],
    cfg: PipelineConfig,
    evaluated: dict[str, Any],
    trained: list[dict[str, Any]],
    force: bool = False,
) -> StageResult:
    workdir = Path(plan["workdir"])
    r = cfg.register

    def work(out: Path) -> dict[str, Any]:
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        table = evaluated["table"]
        best = choose(table, r.metric, r.tie_breaker)
        winner = next(t for t in trained if t["variant"] == best["variant"])
        wins = beats_baseline(table, best, r.metric)
        if not wins:
            log.warning("the best variant (%s) does not beat the grayscale baseline on %s", best["variant"], r.metric)
        folder = Path(winner["folder"])
        uri = tracking.tracking_uri(workdir)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        size = winner["spec"]["image_size"]
        example = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        images = Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))])  # any batch, any photo size
        signature = ModelSignature(inputs=images, outputs=images)
        root = Path(__file__).resolve().parent.parent
        with mlflow.start_run(run_id=winner["mlflow_run_id"]):
            info = tracking.retry_locked(
                mlflow.pyfunc.log_model,
                name="colorizer",
                python_model=str(Path(model.pyfunc.__file__)),  # models from code: nothing pickled
                artifacts={"weights": str(folder / MODEL_FILE), "spec": str(folder / SPEC_FILE)},
                code_paths=[str(root / "model"), str(root / "storage")],
                signature=signature,
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS,
            )
        version = tracking.retry_locked(mlflow.register_model, info.model_uri, r.model_name)
        client = tracking.client(workdir)
        tracking.retry_locked(client.set_registered_model_alias, r.model_name, r.alias, version.version)
        summary = "\n".join(f"{row['variant']}: {r.metric}={row[r.metric]:.6g}" for row in table)
        tracking.retry_locked(
            client.update_model_version,
            r.model_name,
            version.version,
            description=f"Chosen by {r.metric} (tie-breaker {r.tie_breaker}) on the test split.\n{summary}",
        )
        for k, v in {
            "variant": best["variant"],
            "metric": r.metric,
            f"test_{r.metric}": best[r.metric],
            "beats_baseline": wins,
            "train_key": winner["key"],
            "evaluate_key": evaluated["key"],
        }.items():
            tracking.retry_locked(client.set_model_version_tag, r.model_name, version.version, k, str(v))
        write_bytes(out / "registered.txt", f"models:/{r.model_name}@{r.alias} -> version {version.version}\n".encode())
        return {
            "model_name": r.model_name,
            "alias": r.alias,
            "version": int(version.version),
            "variant": best["variant"],
            "metric": r.metric,
            "value": best[r.metric],
            "beats_baseline": wins,
            "model_uri": info.model_uri,
        }

    return run_stage(plan, work, force=force)
