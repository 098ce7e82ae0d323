"""The Prefect DAG: download -> upscale -> prepare -> train x variants -> evaluate -> register.

Tasks exchange plans and manifests (small JSON), never tensors. Caching is Prefect's
``INPUTS + TASK_SOURCE`` over the stage plan (inputs' content digests, the stage's config section and
the hash of its code). A cached result is reused only while the stage folder it names still verifies:
otherwise the call refreshes the cache, so a deleted or tampered folder is recomputed, not trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.context import get_run_context

from flows.config import STAGES, PipelineConfig, build_config
from storage import tracking
from storage.atomic import write_json
from storage.errors import UserFacingError
from storage.stage import finished, plan_folder
from tasks import download as download_stage
from tasks import evaluate as evaluate_stage
from tasks import prepare as prepare_stage
from tasks import register as register_stage
from tasks import train as train_stage
from tasks import upscale as upscale_stage

log = logging.getLogger(__name__)

# The plan carries what decides a stage's output (input content digests, its config section, its code
# hash); the full config, the input manifests and run bookkeeping are excluded so an unrelated setting
# does not invalidate every stage.
_NOT_KEYED = (
    "cfg",
    "download",
    "upscaled",
    "prepared",
    "trained",
    "evaluated",
    "parent_run_id",
    "force",
    "path",
    "dataset",
    "variant",
)
STAGE_CACHE = INPUTS + TASK_SOURCE
for _name in _NOT_KEYED:  # the plan already holds their digests
    STAGE_CACHE = STAGE_CACHE - _name
NETWORK_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30]}


def _out(result: Any) -> dict[str, Any]:
    """The manifest, plus whether the stage folder was already there (another run finished it first)."""
    return {**result.manifest, "reused": result.cached}


def _cfg(cfg: dict[str, Any]) -> PipelineConfig:
    return PipelineConfig.model_validate(cfg)


@task(name="download", cache_policy=STAGE_CACHE, persist_result=True, **NETWORK_RETRIES)
def download_task(plan: dict, cfg: dict, dataset: str, path: str | None, force: bool = False) -> dict[str, Any]:
    return _out(download_stage.run_download(plan, _cfg(cfg), dataset, Path(path) if path else None, force))


@task(name="upscale", cache_policy=STAGE_CACHE, persist_result=True)
def upscale_task(plan: dict, cfg: dict, download: dict, force: bool = False) -> dict[str, Any]:
    return _out(upscale_stage.run_upscale(plan, _cfg(cfg), download, force))


@task(name="prepare", cache_policy=STAGE_CACHE, persist_result=True)
def prepare_task(plan: dict, cfg: dict, download: dict, upscaled: dict | None, force: bool = False) -> dict[str, Any]:
    return _out(prepare_stage.run_prepare(plan, _cfg(cfg), download, upscaled, force))


@task(name="train", cache_policy=STAGE_CACHE, persist_result=True)
def train_task(
    plan: dict, cfg: dict, prepared: dict, variant: str, parent_run_id: str | None = None, force: bool = False
) -> dict[str, Any]:
    return _out(train_stage.run_train(plan, _cfg(cfg), prepared, variant, parent_run_id, force))


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_task(
    plan: dict, cfg: dict, prepared: dict, trained: list[dict], parent_run_id: str | None = None, force: bool = False
) -> dict[str, Any]:
    return _out(evaluate_stage.run_evaluate(plan, _cfg(cfg), prepared, trained, parent_run_id, force))


@task(name="register", cache_policy=STAGE_CACHE, persist_result=True)
def register_task(plan: dict, cfg: dict, evaluated: dict, trained: list[dict], force: bool = False) -> dict[str, Any]:
    return _out(register_stage.run_register(plan, _cfg(cfg), evaluated, trained, force))


class StageFailed(UserFacingError):
    """A stage failed; finished stages stay cached, so rerunning the same command resumes."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} (finished stages are kept: rerun the same command to resume)")


@dataclass
class StageCall:
    """How one stage ended in this flow run: ran, cached (Prefect or stage folder) or failed."""

    stage: str
    state: str
    key: str | None = None
    error: str | None = None


class Runner:
    """Calls stage tasks, records how each ended, and honours --force and --only."""

    def __init__(self, workdir: Path, force: set[str], only: str | None) -> None:
        self.workdir, self.force, self.only = workdir, force, only
        self.calls: list[StageCall] = []

    def _options(self, name: str, plan: dict[str, Any], intact_check: Callable[[], bool] | None) -> dict[str, Any]:
        stage = plan["stage"]
        forced = stage in self.force
        folder_ok = finished(plan) is not None
        effect_ok = intact_check() if folder_ok and intact_check is not None else True
        if folder_ok and not effect_ok:  # e.g. the registry lost the version: redo the stage's side effect
            log.warning("%s: its stage folder is intact but its external result is gone; redoing it", name)
            forced = True
        intact = not forced and folder_ok
        if not intact and not forced and plan_folder(plan).exists():
            log.warning("%s: stored output at %s failed verification; recomputing", name, plan_folder(plan))
        if self.only and STAGES.index(stage) < STAGES.index(self.only) and not intact:
            raise StageFailed(
                f"--only {self.only} needs a finished {stage} stage; run `colorize run --until {stage}` first"
            )
        return {"refresh_cache": not intact, "forced": forced}

    def submit(
        self, name: str, fn: Any, plan: dict[str, Any], intact_check: Callable[[], bool] | None = None, **kwargs: Any
    ) -> Any:
        opts = self._options(name, plan, intact_check)
        return fn.with_options(name=name, refresh_cache=opts["refresh_cache"]).submit(
            plan=plan, force=opts["forced"], **kwargs
        )

    def resolve(self, name: str, plan: dict[str, Any], future: Any) -> dict[str, Any] | None:
        """The manifest of a finished task, or None (recorded as failed) if it failed."""
        future.wait()
        state = future.state
        if state.is_failed() or state.is_crashed():
            message = str(state.message or "failed")
            self.calls.append(StageCall(name, "failed", plan["key"], message))
            write_json(
                self.workdir / plan["stage"] / "last.json", {"state": "failed", "key": plan["key"], "error": message}
            )
            return None
        manifest = state.result()
        cached = state.name == "Cached" or manifest.get("reused", False)
        self.calls.append(StageCall(name, "cached" if cached else "ran", plan["key"]))
        if cached:
            write_json(
                self.workdir / plan["stage"] / "last.json", {"state": "cached", "key": plan["key"], "seconds": 0}
            )
        return manifest

    def __call__(
        self, name: str, fn: Any, plan: dict[str, Any], intact_check: Callable[[], bool] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        manifest = self.resolve(name, plan, self.submit(name, fn, plan, intact_check, **kwargs))
        if manifest is None:
            raise StageFailed(f"{name} failed: {self.calls[-1].error}")
        return manifest


def _registered(workdir: Path, plan: dict[str, Any]) -> Callable[[], bool]:
    """The register stage is intact only if the registry still has the version its manifest names."""

    def check() -> bool:
        manifest = finished(plan)
        try:
            version = tracking.client(workdir).get_model_version_by_alias(manifest["model_name"], manifest["alias"])
        except Exception:  # noqa: BLE001 - no registry, no model, no alias: all mean "not intact"
            return False
        return int(version.version) == manifest["version"]

    return check


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # noqa: BLE001
        return "unknown"


@flow(name="colorize-pipeline", log_prints=True, persist_result=True)
def pipeline(
    dataset: str = "sample",
    preset: str = "demo",
    overrides: list[str] | None = None,
    path: str | None = None,
    workdir: str = "work",
    until: str = "register",
    only: str | None = None,
    force: list[str] | None = None,
) -> dict[str, Any]:
    """Run the stages up to ``until`` (or just ``only``); return what each did and where its output is."""
    cfg = build_config(preset, overrides)
    cfg_dict = cfg.model_dump()
    wd = Path(workdir).resolve()
    run = Runner(wd, set(force or []), only)
    stop = STAGES.index(only or until)
    out: dict[str, Any] = {"workdir": str(wd), "stages": {}, "calls": []}

    def done() -> dict[str, Any]:
        out["calls"] = [asdict(c) for c in run.calls]
        return out

    def runs(stage: str) -> bool:
        return only is None or STAGES.index(stage) <= STAGES.index(only)

    dl = run(
        "download",
        download_task,
        download_stage.plan_download(cfg, dataset, wd, Path(path) if path else None),
        cfg=cfg_dict,
        dataset=dataset,
        path=path,
    )
    out["stages"]["download"] = dl["folder"]
    if stop == STAGES.index("download"):
        return done()

    up = None
    if upscale_stage.has_lowres(dl):  # high-res-only sources skip Real-ESRGAN: the DAG decides
        up = run("upscale", upscale_task, upscale_stage.plan_upscale(cfg, dl, wd), cfg=cfg_dict, download=dl)
        out["stages"]["upscale"] = up["folder"]
    if stop == STAGES.index("upscale"):
        return done()

    prep = run(
        "prepare", prepare_task, prepare_stage.plan_prepare(cfg, dl, up, wd), cfg=cfg_dict, download=dl, upscaled=up
    )
    out["stages"]["prepare"] = prep["folder"]
    if stop == STAGES.index("prepare"):
        return done()

    parent = tracking.start_run(
        wd, f"pipeline-{dataset}", tags={"prefect.flow_run_id": _flow_run_id(), "dataset": dataset, "preset": preset}
    )
    out["mlflow_parent_run_id"] = parent
    status = "FAILED"
    try:
        tracking.log_params(wd, parent, {**tracking.flatten("", cfg_dict), "dataset": dataset, "preset": preset})
        plans = {v: train_stage.plan_train(cfg, prep, v, wd) for v in cfg.train.variants}
        trained, failed = [], []
        pending = []
        for variant, plan in plans.items():
            future = run.submit(
                f"train-{variant}", train_task, plan, cfg=cfg_dict, prepared=prep, variant=variant, parent_run_id=parent
            )
            pending.append((variant, plan, future))
            if not cfg.train.concurrent:  # on a CPU, variants would fight for the same cores
                future.wait()
        for variant, plan, future in pending:
            manifest = run.resolve(f"train-{variant}", plan, future)
            (trained.append(manifest) if manifest is not None else failed.append(variant))
        for t in trained:
            out["stages"][f"train-{t['variant']}"] = t["folder"]
            tracking.set_tags(wd, parent, {f"train_run.{t['variant']}": t["mlflow_run_id"]})
        if failed:
            raise StageFailed(
                f"training failed for {', '.join(failed)}: "
                + "; ".join(c.error or "" for c in run.calls if c.state == "failed")
            )
        if stop == STAGES.index("train"):
            status = "FINISHED"
            return done()

        ev = run(
            "evaluate",
            evaluate_task,
            evaluate_stage.plan_evaluate(cfg, prep, trained, wd),
            cfg=cfg_dict,
            prepared=prep,
            trained=trained,
            parent_run_id=parent,
        )
        out["stages"]["evaluate"] = ev["folder"]
        out["metrics_md"] = str(Path(ev["folder"]) / "metrics.md")
        if stop == STAGES.index("evaluate"):
            status = "FINISHED"
            return done()

        reg_plan = register_stage.plan_register(cfg, ev, trained, wd)
        reg = run(
            "register",
            register_task,
            reg_plan,
            intact_check=_registered(wd, reg_plan),
            cfg=cfg_dict,
            evaluated=ev,
            trained=trained,
        )
        out["stages"]["register"] = reg["folder"]
        out["registered"] = {
            k: reg[k] for k in ("model_name", "alias", "version", "variant", "metric", "value", "beats_baseline")
        }
        tracking.set_tags(wd, parent, {"champion": f"{reg['variant']} (version {reg['version']})"})
        status = "FINISHED"
        return done()
    finally:
        tracking.end_run(wd, parent, status)
