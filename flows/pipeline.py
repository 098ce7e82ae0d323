"""The Prefect DAG: download -> upscale -> prepare -> train x variants -> evaluate -> register.

Tasks exchange plans and manifests (small JSON), never tensors. Caching is Prefect's
``INPUTS + TASK_SOURCE`` over the stage plan (inputs' content digests, the stage's config section and
the hash of its code). A cached result is reused only while the stage folder it names still verifies:
otherwise the call refreshes the cache, so a deleted or tampered folder is recomputed, not trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from flows.config import STAGES, PipelineConfig, build_config
from storage.stage import finished, plan_folder, write_json
from tasks import download as download_stage
from tasks import prepare as prepare_stage
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
)
STAGE_CACHE = INPUTS + TASK_SOURCE
for _name in _NOT_KEYED:  # the plan already holds their digests
    STAGE_CACHE = STAGE_CACHE - _name
NETWORK_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30]}


@task(name="download", cache_policy=STAGE_CACHE, persist_result=True, **NETWORK_RETRIES)
def download_task(
    plan: dict[str, Any], cfg: dict[str, Any], dataset: str, path: str | None, force: bool = False
) -> dict[str, Any]:
    config = PipelineConfig.model_validate(cfg)
    return download_stage.run_download(plan, config, dataset, Path(path) if path else None, force).manifest


@task(name="upscale", cache_policy=STAGE_CACHE, persist_result=True)
def upscale_task(
    plan: dict[str, Any], cfg: dict[str, Any], download: dict[str, Any], force: bool = False
) -> dict[str, Any]:
    return upscale_stage.run_upscale(plan, PipelineConfig.model_validate(cfg), download, force).manifest


@task(name="prepare", cache_policy=STAGE_CACHE, persist_result=True)
def prepare_task(
    plan: dict[str, Any],
    cfg: dict[str, Any],
    download: dict[str, Any],
    upscaled: dict[str, Any] | None,
    force: bool = False,
) -> dict[str, Any]:
    config = PipelineConfig.model_validate(cfg)
    return prepare_stage.run_prepare(plan, config, download, upscaled, force).manifest


@dataclass
class StageCall:
    """How one stage ended in this flow run: ran, cached (Prefect or stage folder) or failed."""

    stage: str
    state: str
    key: str | None = None
    error: str | None = None


class Runner:
    """Calls stage tasks, records how each ended, and honours --force / --only."""

    def __init__(self, workdir: Path, force: set[str]) -> None:
        self.workdir, self.force = workdir, force
        self.calls: list[StageCall] = []

    def __call__(self, name: str, fn: Callable[..., Any], plan: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        stage = plan["stage"]
        forced = stage in self.force
        intact = not forced and finished(plan) is not None
        if not intact and stage not in self.force and plan_folder(plan).exists():
            log.warning("%s: stored output at %s failed verification; recomputing", name, plan_folder(plan))
        state = fn.with_options(name=name, refresh_cache=not intact)(
            plan=plan, return_state=True, force=forced, **kwargs
        )
        if state.is_failed():
            self.calls.append(StageCall(name, "failed", plan["key"], str(state.message)))
            write_json(
                self.workdir / stage / "last.json", {"state": "failed", "key": plan["key"], "error": str(state.message)}
            )
            raise RuntimeError(f"{name} failed: {state.message}")
        manifest = state.result()
        cached = state.name == "Cached"
        self.calls.append(StageCall(name, "cached" if cached else "ran", plan["key"]))
        if cached:
            write_json(self.workdir / stage / "last.json", {"state": "cached", "key": plan["key"], "seconds": 0})
        return manifest


@flow(name="colorize-pipeline", log_prints=True, persist_result=True)
def pipeline(
    dataset: str = "sample",
    preset: str = "demo",
    overrides: list[str] | None = None,
    path: str | None = None,
    workdir: str = "work",
    until: str = "register",
    force: list[str] | None = None,
) -> dict[str, Any]:
    """Run the stages up to ``until``; return what each did and where its output is."""
    cfg = build_config(preset, overrides)
    wd = Path(workdir).resolve()
    run = Runner(wd, set(force or []))
    stop = STAGES.index(until)
    out: dict[str, Any] = {"workdir": str(wd), "stages": {}}

    plan = download_stage.plan_download(cfg, dataset, wd, Path(path) if path else None)
    cfg_dict = cfg.model_dump()
    dl = run("download", download_task, plan, cfg=cfg_dict, dataset=dataset, path=path)
    out["stages"]["download"] = dl["folder"]
    if stop == STAGES.index("download"):
        return _finish(out, run)

    up = None
    if upscale_stage.has_lowres(dl):  # high-res-only sources skip Real-ESRGAN: the DAG decides
        up = run("upscale", upscale_task, upscale_stage.plan_upscale(cfg, dl, wd), cfg=cfg_dict, download=dl)
        out["stages"]["upscale"] = up["folder"]
    if stop == STAGES.index("upscale"):
        return _finish(out, run)

    prep_plan = prepare_stage.plan_prepare(cfg, dl, up, wd)
    prep = run("prepare", prepare_task, prep_plan, cfg=cfg_dict, download=dl, upscaled=up)
    out["stages"]["prepare"] = prep["folder"]
    if stop == STAGES.index("prepare"):
        return _finish(out, run)
    raise NotImplementedError(f"stages after prepare arrive with later issues (asked --until {until})")


def _finish(out: dict[str, Any], run: Runner) -> dict[str, Any]:
    out["calls"] = [c.__dict__ for c in run.calls]
    return out
