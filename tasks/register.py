"""Register stage: pick the best variant by a configurable metric, log it as an MLflow pyfunc model with
its ONNX export when that export reproduces eager PyTorch (model/onnx_engine.py; without one otherwise,
or with ``register.onnx=false``, tagged ``onnx_export=none`` with the reason), register it as
``colorizer`` and point the ``champion`` alias at it, with the evaluation table attached.

Selection is by the test-table metric (default RGB MSE, lower is better) with a second metric breaking
ties; a variant whose metric is not a finite number is never chosen. With several training seeds the
champion *variant* is chosen by its mean over seeds, and the model registered is that variant's best
seed by the same metric: the mean is the honest figure for the variant (tagged ``test_<metric>_mean``),
while the registered model is the best one trained (its own score is tagged too, and is optimistic by
selection). A variant that does not beat the grayscale baseline on the chosen metric is still registered
(the user asked for a champion), but the version is tagged ``beats_baseline=false`` and a warning says
so; whether the paired 95% interval against the baseline excludes zero is in the manifest beside it.

The choice is a value (:func:`decide` -> :class:`Champion`: which variant and seed, by which metric, its
value, the baseline comparison and its interval), computed without MLflow; :func:`log_version` is the
thin layer that logs a model folder to the registry. The version's tags say what the stage's manifest
does not (``train_key``: which training stage folder it came from), and repeat only what readers of the
registry use: the variant and head (``colorize app``'s summary), the vividness, the test scores
(``test_*``), ``beats_baseline`` and the ONNX export's state. The seed, the number of seeds, the metric,
``beats_baseline_95ci`` and the evaluate key are the manifest's alone (and the version's description).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.colorizer import MODEL_FILE, SPEC_FILE, load_trained
from model.metrics import BASELINE, COLUMNS, HIGHER_IS_BETTER
from storage.atomic import write_bytes, write_json
from storage.code_identity import code_version
from storage.errors import disk_full
from storage.stage import SCRATCH, StageResult, finished, make_plan, run_stage
from storage.tracking import Tracker, flatten, retry_locked, tracking_uri
from tasks.settings.register import Settings

log = logging.getLogger(__name__)
STAGE = "register"
ONNX_OFF = "register.onnx=false"  # the reason recorded when the export is skipped by config


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


@dataclass(frozen=True)
class Champion:
    """The choice, and why: the variant (best mean over seeds by ``metric``, ``tie_breaker`` breaking
    ties) and the seed registered (that variant's best by the same metric), the variant's mean
    (``value``) and the registered model's own score (``model_value``, optimistic: it was selected),
    whether the mean beats the grayscale baseline and whether the paired 95% interval against it
    (``vs_baseline``: model.study's comparison, None when there is none) says so too. ``trained``: the
    registered model's train manifest; ``row``: its row of the evaluation table; ``standings``: every
    variant's (and the baseline's) mean on ``metric``, with its spread over seeds."""

    variant: str
    seed: int
    n_seeds: int
    metric: str
    tie_breaker: str
    value: float
    model_value: float
    beats_baseline: bool
    beats_baseline_95ci: bool
    vs_baseline: dict[str, Any] | None
    trained: dict[str, Any]
    row: dict[str, Any]
    standings: list[str]

    def description(self) -> str:
        """The registered version's description: how it was chosen, and every variant's score."""
        return (
            f"Chosen by {self.metric} (tie-breaker {self.tie_breaker}, mean over seeds) on the test split; "
            f"this version is seed {self.seed}.\n" + "\n".join(self.standings)
        )


def decide(evaluated: Mapping[str, Any], trained: Sequence[dict[str, Any]], metric: str, tie_breaker: str) -> Champion:
    """The champion from the evaluate stage's manifest (``table``, ``variant_table``, ``comparisons``) and
    the train manifests: plain values, no registry."""
    table, variant_table = evaluated["table"], evaluated["variant_table"]
    best = choose(variant_table, metric, tie_breaker)
    model_row = choose([row for row in table if row["variant"] == best["variant"]], metric, tie_breaker)
    winner = next(t for t in trained if (t["variant"], t["seed"]) == (best["variant"], model_row["seed"]))
    wins = beats_baseline(variant_table, best, metric)
    interval = next(
        (c for c in evaluated["comparisons"] if (c["a"], c["b"], c["metric"]) == (best["variant"], BASELINE, metric)),
        None,
    )
    standings = [
        f"{row['variant']}: {metric}={row[metric]:.6g}"
        + (f" ± {row[metric + '_std']:.2g} over {row['n_seeds']} seeds" if row["n_seeds"] > 1 else "")
        for row in variant_table
    ]
    return Champion(
        variant=best["variant"],
        seed=winner["seed"],
        n_seeds=best["n_seeds"],
        metric=metric,
        tie_breaker=tie_breaker,
        value=best[metric],
        model_value=model_row[metric],
        beats_baseline=wins,
        beats_baseline_95ci=bool(interval and interval["significant"] and wins),
        vs_baseline=interval,
        trained=winner,
        row=model_row,
        standings=standings,
    )


def shipped(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What the shipped spec says about the model: its head, a classification head's vividness, and the
    hints a hinted model takes (a model without them is tagged as before hints existed)."""
    classifies = spec.get("head") == "classification"
    hints = spec.get("hints", "off")
    return {
        "head": spec.get("head", "regression"),
        **({"vividness": spec["temperature"]} if classifies else {}),
        **({"hints": hints} if hints != "off" else {}),
    }


HINTS_SAID = {
    "off": "Takes no hints (trained with train.hints=off): colorize image --hint/--reference refuse it.",
    "local": "Takes colour points (colorize image --hint, --hints; trained with train.hints=local).",
    "local+global": "Takes colour points and a reference photo (colorize image --hint, --hints, --reference; "
    "colorize video --reference; trained with train.hints=local+global).",
}


def description(champion: Champion, spec: Mapping[str, Any]) -> str:
    """The registered version's description: the choice and why, then which hints the model takes."""
    return champion.description() + "\n" + HINTS_SAID[spec.get("hints", "off")]


def version_tags(champion: Champion, spec: Mapping[str, Any], onnx: Mapping[str, Any]) -> dict[str, str]:
    """The registered version's tags (see the module docstring for which, and why these)."""
    tags = {
        "variant": champion.variant,
        **shipped(spec),
        f"test_{champion.metric}": champion.model_value,
        f"test_{champion.metric}_mean": champion.value,
        "beats_baseline": champion.beats_baseline,
        "train_key": champion.trained["key"],
        "onnx_export": "attached" if onnx["attached"] else "none",
        **({} if onnx["attached"] else {"onnx_reason": onnx["reason"]}),
    }
    return {k: str(v) for k, v in tags.items()}


def manifest(
    champion: Champion, spec: Mapping[str, Any], r: Settings, version: int, model_uri: str, onnx: Mapping[str, Any]
) -> dict[str, Any]:
    """The stage's manifest fields: where the champion is, which it is and why."""
    return {
        "model_name": r.model_name,
        "alias": r.alias,
        "version": version,
        "variant": champion.variant,
        **shipped(spec),
        "seed": champion.seed,
        "n_seeds": champion.n_seeds,
        "metric": champion.metric,
        "value": champion.value,
        "model_value": champion.model_value,
        "beats_baseline": champion.beats_baseline,
        "beats_baseline_95ci": champion.beats_baseline_95ci,
        "vs_baseline": champion.vs_baseline,
        "model_uri": model_uri,
        "onnx": dict(onnx),
    }


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


def log_version(
    tracker: Tracker,
    run_id: str,
    folder: Path,
    spec_path: Path,
    scratch: Path,
    model_name: str,
    alias: str,
    onnx_path: Path | None = None,
    no_onnx: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """The MLflow side, through ``tracker``'s store: log the model in ``folder`` (its weights, the spec
    at ``spec_path``, the ONNX export at ``onnx_path`` if any, else ``no_onnx`` saying why not) as a
    pyfunc model in run ``run_id`` (models from code, a uint8 image-tensor signature with a
    classification head's ``vividness``, the project code it imports), register it as ``model_name``,
    point ``alias`` at it and give the version ``description`` and ``tags``. ``scratch``: a folder for
    the files staged on the way. Returns (version, model URI)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    from model import bundle, pyfunc  # imports mlflow: only when registering, not when composing settings

    spec = json.loads(spec_path.read_text())
    uri = tracking_uri(tracker.workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    size = spec["image_size"]
    example = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    images = Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))])  # any batch, any photo size
    classifies = spec.get("head") == "classification"
    taken = [ParamSpec(pyfunc.VIVIDNESS, "double", spec["temperature"])] if classifies else []
    taken += [ParamSpec(name, "string", "") for name in pyfunc.hint_params(spec.get("hints", "off"))]
    params = ParamSchema(taken) if taken else None
    signature = ModelSignature(inputs=images, outputs=images, params=params)
    entry = scratch / "colorizer_model.py"
    write_bytes(entry, pyfunc.ENTRY.encode())
    code_paths = bundle.stage_code(scratch / "code")  # only what the model imports
    artifacts = {"weights": str(folder / MODEL_FILE), "spec": str(spec_path)}
    if onnx_path is not None:
        artifacts["onnx"] = str(onnx_path)
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
            model_config={pyfunc.NO_ONNX: no_onnx} if onnx_path is None and no_onnx else None,
        )
    version = retry_locked(mlflow.register_model, info.model_uri, model_name)
    client = tracker.client
    retry_locked(client.set_registered_model_alias, model_name, alias, version.version)
    if description is not None:
        retry_locked(client.update_model_version, model_name, version.version, description=description)
    for k, v in (tags or {}).items():
        retry_locked(client.set_model_version_tag, model_name, version.version, k, v)
    return int(version.version), info.model_uri


def run(plan: dict[str, Any], force: bool = False) -> StageResult:
    workdir = Path(plan["workdir"])
    r = Settings.model_validate(plan["config"])
    evaluated, trained = plan["inputs"]["evaluated"], plan["inputs"]["trained"]

    def work(out: Path) -> dict[str, Any]:
        champion = decide(evaluated, trained, r.metric, r.tie_breaker)
        if not champion.beats_baseline:
            log.warning("the best variant (%s) does not beat the grayscale baseline on %s", champion.variant, r.metric)
        folder, scratch = Path(champion.trained["folder"]), out / SCRATCH
        spec_path, spec = _model_spec(folder, evaluated.get("temperature"), scratch)
        if r.onnx:
            onnx_path, onnx = _try_onnx(folder, spec_path, scratch)
        else:
            onnx_path, onnx = None, {"attached": False, "reason": ONNX_OFF}
        tracker = Tracker(workdir)
        run_id = champion.trained["mlflow_run_id"]
        if not tracker.run_exists(run_id):  # mlflow.db was lost or replaced: the cached training run is gone
            run_id = _recreate_run(tracker, champion.trained, champion.row)
        version, model_uri = log_version(
            tracker,
            run_id,
            folder,
            spec_path,
            scratch,
            r.model_name,
            r.alias,
            onnx_path,
            no_onnx=onnx.get("reason"),
            description=description(champion, spec),
            tags=version_tags(champion, spec, onnx),
        )
        write_bytes(out / "registered.txt", f"models:/{r.model_name}@{r.alias} -> version {version}\n".encode())
        return manifest(champion, spec, r, version, model_uri, onnx)

    return run_stage(plan, work, force=force)
