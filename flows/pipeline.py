"""The Prefect DAG: download -> upscale -> prepare -> train x variants -> evaluate -> register.

The wiring is flows/dag.py's list: each stage in order, its plans made from the results of the stages
it names, run as one task per plan (a stage with no plan is skipped, one with several fans out and
fails once all have ended). What the run reports beyond the stage folders (the test table, the
champion) is in ``_REPORTS``.

One cache: every stage runs through one Prefect task whose cache key is the stage plan's key (the
stage's own settings, the facts resolved for this run, its inputs' content digests and the hash of
every module it imports), scoped to the work dir. A cached result is reused only while the stage
folder it names still verifies: otherwise the call refreshes the cache, so a deleted or tampered
folder is recomputed, not trusted. Tasks exchange plans and manifests (small JSON), never tensors.
"""

from __future__ import annotations

import json
import logging
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from prefect import flow, task
from prefect.context import get_run_context

from flows import config as pipeline_config
from flows import dag, run_page
from flows.config import PipelineConfig
from flows.dag import StageSpec
from storage import progress, shard_runner
from storage.errors import TransientError, UserFacingError, disk_full
from storage.redact import redact, redact_text
from storage.stage import digest, finished, plan_folder, record
from storage.stage_store import StageStore
from storage.tracking import Tracker, flatten

log = logging.getLogger(__name__)
_RESUME = "finished stages are kept: rerun the same command to resume"
_TRANSIENT = (TransientError, urllib.error.URLError, ConnectionError, TimeoutError)


def retry_helps(_task: Any, _run: Any, state: Any) -> bool:
    """Prefect's retry condition for the download stage: only a network failure is worth the 35 s of
    retries; the user's own mistake (an unsafe archive, a folder of grey photos, a bad setting) or a
    full disk would fail the same way, and the user would wait for the same one-line error."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return exc is None or (isinstance(exc, _TRANSIENT) and not disk_full(exc))


NETWORK_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": retry_helps}


def stage_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    """Prefect's cache key: the plan's key, scoped to the work dir (a copied or moved work dir keeps its
    stage folders, and they are found by the stage itself, never through another dir's cache record)."""
    plan = parameters["plan"]
    return f"{plan['stage']}-{plan['key']}-{digest(plan['workdir'])[:8]}"


@task(name="stage", cache_key_fn=stage_cache_key, persist_result=True)
def stage_task(plan: dict[str, Any], force: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one stage from its plan; return its manifest, plus whether another run had already finished it."""
    try:
        with progress.listening(run_page.ProgressArtifact(plan["stage"])):
            result = dag.spec(plan["stage"]).load().run(plan, force=force, **(extra or {}))
    except Exception as exc:
        clean = _redacted(exc)
        if clean is exc:
            raise
        raise clean from None  # the original's chain holds the secret too
    return {**result.manifest, "reused": result.cached}


def _redacted(exc: Exception) -> Exception:
    """``exc`` itself when its message holds no secret, else the same error with the secret as ``***``:
    what crosses the task boundary becomes Prefect's state message, stored in its database."""
    text = str(exc)
    clean = redact_text(text)
    if clean == text:
        return exc
    try:
        copy = type(exc)(clean)
    except Exception:  # noqa: BLE001 - an exception type with another signature
        copy = RuntimeError(f"{type(exc).__name__}: {clean}")
    for attr in ("exit_code", "rerun_helps"):
        if hasattr(exc, attr):
            setattr(copy, attr, getattr(exc, attr))
    return copy


class StageFailed(UserFacingError):
    """A stage failed; the message says why, and says to rerun only when rerunning can help."""

    def __init__(self, message: str, exit_code: int = 1, rerun_helps: bool = False) -> None:
        super().__init__(message)
        self.exit_code, self.rerun_helps = exit_code, rerun_helps


def describe(exc: BaseException | None, crashed: bool) -> StageFailed:
    """A task's exception as the user should read it, with any secret in it redacted."""
    failure = _describe(exc, crashed)
    return StageFailed(redact_text(str(failure)), failure.exit_code, failure.rerun_helps)


def _describe(exc: BaseException | None, crashed: bool) -> StageFailed:
    """Their own mistake as raised (exit 2, no hint); an interruption or a network failure with the
    resume hint; anything else with its type."""
    if isinstance(exc, UserFacingError) and not isinstance(exc, TransientError):
        return StageFailed(str(exc), exc.exit_code, exc.rerun_helps)
    if exc is not None and disk_full(exc):
        return StageFailed(disk_full(exc), 1, True)
    if crashed or exc is None or isinstance(exc, (*_TRANSIENT, KeyboardInterrupt)):
        why = str(exc) if exc is not None and str(exc) else "interrupted"
        return StageFailed(f"{why} ({_RESUME})", 1, True)
    return StageFailed(f"{type(exc).__name__}: {exc} (fix the cause; {_RESUME})", 1, True)


@dataclass
class StageCall:
    """How one stage ended in this flow run: ran, cached (Prefect or stage folder), pulled (from the
    stage store) or failed."""

    stage: str
    state: str
    key: str | None = None
    error: str | None = None


class Runner:
    """Submits stage tasks, records how each ended, and honours --force and --only."""

    def __init__(self, workdir: Path, force: set[str], only: str | None, store: StageStore | None = None) -> None:
        self.workdir, self.force, self.only, self.store = workdir, force, only, store
        self.pulled: set[str] = set()  # keys of the stages fetched from the store in this run
        self.calls: list[StageCall] = []
        self.failures: list[StageFailed] = []

    def submit(
        self, name: str, plan: dict[str, Any], intact_check: Callable[[], bool] | None = None, **extra: Any
    ) -> Any:
        stage = plan["stage"]
        forced = stage in self.force
        folder_ok = finished(plan) is not None
        if not folder_ok and not forced and self.store is not None:  # finished elsewhere: fetched, verified
            folder_ok = self.store.pull(plan) is not None
            if folder_ok:
                self.pulled.add(plan["key"])
        if folder_ok and intact_check is not None and not intact_check():
            log.warning("%s: its stage folder is intact but its external result is gone; redoing it", name)
            forced = True
            self.pulled.discard(plan["key"])
        intact = folder_ok and not forced
        if not intact and not forced and plan_folder(plan).exists():
            log.warning("%s: stored output at %s failed verification; recomputing", name, plan_folder(plan))
        if self.only and dag.STAGES.index(stage) < dag.STAGES.index(self.only) and not intact:
            raise StageFailed(
                f"--only {self.only} needs a finished {stage} stage; run `colorize run --until {stage}` first", 2
            )
        options = NETWORK_RETRIES if "network" in dag.spec(stage).uses else {}  # retried on a network failure
        return stage_task.with_options(name=name, refresh_cache=not intact, **options).submit(
            plan=plan, force=forced, extra=extra or None
        )

    def resolve(self, name: str, plan: dict[str, Any], future: Any) -> dict[str, Any] | None:
        """The manifest of a finished task, or None (recorded as failed) if it failed."""
        future.wait()
        state = future.state
        if state.is_failed() or state.is_crashed():
            exc = state.result(raise_on_failure=False)
            failure = describe(exc if isinstance(exc, BaseException) else None, state.is_crashed())
            self.calls.append(StageCall(name, "failed", plan["key"], str(failure)))
            self.failures.append(failure)
            record(self.workdir, plan["stage"], "failed", key=plan["key"], error=str(failure))
            return None
        manifest = state.result()
        cached = state.name == "Cached" or manifest.get("reused", False)
        state_name = "pulled" if plan["key"] in self.pulled else "cached" if cached else "ran"
        self.calls.append(StageCall(name, state_name, plan["key"]))
        if state.name == "Cached" or state_name == "pulled":  # what the stage itself could not know
            record(self.workdir, plan["stage"], state_name, key=plan["key"], seconds=0)
        if self.store is not None:
            self.store.publish(manifest["folder"])
        return manifest

    def __call__(
        self, name: str, plan: dict[str, Any], intact_check: Callable[[], bool] | None = None, **extra: Any
    ) -> dict[str, Any]:
        manifest = self.resolve(name, plan, self.submit(name, plan, intact_check, **extra))
        if manifest is None:
            failure = self.failures[-1]
            raise StageFailed(f"{name} failed: {failure}", failure.exit_code, failure.rerun_helps)
        return manifest


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # noqa: BLE001
        return "unknown"


def redact_overrides(overrides: list[str]) -> list[str]:
    """``--set`` items with credentials and tokens replaced by ``***``: what Prefect stores as the flow
    run's ``overrides`` (the flow itself is given the validated config, see :func:`pipeline`)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip().startswith("store.options"):  # a library's client options: names only
            value = json.dumps(pipeline_config.masked_options(value))
        else:
            value = redact(key, value)
        out.append(f"{key}{sep}{value}" if sep else redact_text(item))
    return out


def preflight(cfg: PipelineConfig) -> None:
    """Checks a stage can make before any work starts (each stage module's optional ``preflight``), the
    Dask runner's and the stage store's probe."""
    for spec in dag.SPECS:
        check = getattr(spec.load(), "preflight", None)
        if check is not None:
            check(getattr(cfg, spec.name))
    shard_runner.check(cfg.runner)
    if (store := StageStore.of(cfg.store)) is not None:
        store.check()


def configure_run(dataset: str, preset: str, overrides: list[str] | None, path: str | None) -> PipelineConfig:
    """The config of one run, validated once: ``dataset`` and ``path`` are the download section's settings."""
    every = [*(overrides or []), f"download.dataset={dataset}"] + ([f"download.path={path}"] if path else [])
    return pipeline_config.build_config(preset, every)


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
    config: PipelineConfig | None = None,
) -> dict[str, Any]:
    """Run the stages up to ``until`` (or just ``only``); return what each did and where its output is.

    ``config``: the run's settings, already validated and preflight-checked by the caller (``colorize
    run``), which is then the one place they are built; Prefect stores its redacted form (see
    flows.config). Without it (a deployment's run, a call from Python) it is built here from ``preset``,
    ``overrides``, ``dataset`` and ``path``, and checked, once."""
    run_page.stage_logs_at_info()
    cfg = config
    if cfg is None:
        cfg = configure_run(dataset, preset, overrides, path)
        preflight(cfg)
    wd = Path(workdir).resolve()
    runner = Runner(wd, set(force or []), only, StageStore.of(cfg.store))
    stop = dag.STAGES.index(only or until)
    out: dict[str, Any] = {"workdir": str(wd), "flow_run_id": _flow_run_id(), "stages": {}, "calls": []}
    shard_options = {"runner": cfg.runner.model_dump(), "store": cfg.store.url}  # where shard jobs run and meet
    results: dict[str, Any] = {}
    parent = ParentRun(wd, dataset, preset, cfg)
    try:
        for spec in dag.SPECS:
            module = spec.load()
            section = getattr(cfg, spec.name)
            plans = module.plans(section, cfg.seed, {name: results.get(name) for name in spec.inputs}, wd)
            extra: dict[str, Any] = dict(shard_options) if "shards" in spec.uses else {}
            if "parent_run" in spec.uses:
                extra["parent_run_id"] = parent.start()
            concurrent = bool(getattr(section, "concurrent", False))
            results[spec.name] = _run_stage(runner, spec, module, plans, extra, concurrent, out, parent)
            if (report := _REPORTS.get(spec.name)) is not None:
                report(results[spec.name], out, parent)
            if dag.STAGES.index(spec.name) == stop:
                break
        parent.status = "FINISHED"
        if parent.id is not None:
            out["mlflow_parent_run_id"] = parent.id
        out["calls"] = [asdict(c) for c in runner.calls]
        return out
    finally:
        parent.end()


class ParentRun:
    """The pipeline's MLflow run, started when the first stage that logs under it is reached (a run that
    stops before training has none): the config as params, the flow run's id as a tag."""

    def __init__(self, workdir: Path, dataset: str, preset: str, cfg: PipelineConfig) -> None:
        self.workdir, self.dataset, self.preset, self.cfg = workdir, dataset, preset, cfg
        self.tracker: Tracker | None = None
        self.id: str | None = None
        self.status = "FAILED"

    def start(self) -> str:
        if self.id is None:
            self.tracker = Tracker(self.workdir)
            tags = {"prefect.flow_run_id": _flow_run_id(), "dataset": self.dataset, "preset": self.preset}
            self.id = self.tracker.start_run(f"pipeline-{self.dataset}", tags=tags)
            params = {**flatten("", self.cfg.model_dump(mode="json")), "dataset": self.dataset, "preset": self.preset}
            self.tracker.log_params(self.id, params)
        return self.id

    def tag(self, tags: dict[str, str]) -> None:
        if self.id is not None:
            self.tracker.set_tags(self.id, tags)

    def end(self) -> None:
        if self.id is not None:
            self.tracker.end_run(self.id, self.status)


def _run_stage(
    runner: Runner,
    spec: StageSpec,
    module: ModuleType,
    plans: dict[str, dict[str, Any]],
    extra: dict[str, Any],
    concurrent: bool,
    out: dict[str, Any],
    parent: ParentRun,
) -> Any:
    """One stage's tasks: its manifest (one plan under the stage's name), None (no plan: skipped), or
    the list of its tasks' manifests (one per plan: a failure of any is raised once all have ended)."""
    if not plans:
        return None
    check = getattr(module, "intact", None)
    if list(plans) == [spec.name]:
        plan = plans[spec.name]
        manifest = runner(spec.name, plan, (lambda: check(plan)) if check else None, **extra)
        out["stages"][spec.name] = manifest["folder"]
        return manifest
    pending = []
    for name, plan in plans.items():
        pending.append((name, plan, runner.submit(name, plan, None, **extra)))
        if not concurrent:  # on a CPU, variants would fight for the same cores
            pending[-1][2].wait()
    done, failed = [], []
    for name, plan, future in pending:
        manifest = runner.resolve(name, plan, future)
        (done.append((name, manifest)) if manifest is not None else failed.append(name.removeprefix(f"{spec.name}-")))
    for name, manifest in done:
        out["stages"][name] = manifest["folder"]
        if "mlflow_run_id" in manifest:
            parent.tag({f"{spec.name}_run.{name.removeprefix(f'{spec.name}-')}": manifest["mlflow_run_id"]})
    if failed:
        worst = max(runner.failures, key=lambda f: f.exit_code)
        raise StageFailed(
            f"{getattr(module, 'WHAT', spec.name)} failed for {', '.join(failed)}: "
            + "; ".join(str(f) for f in runner.failures),
            worst.exit_code,
            all(f.rerun_helps for f in runner.failures),
        )
    return [manifest for _, manifest in done]


def _report_evaluation(manifest: dict[str, Any], out: dict[str, Any], parent: ParentRun) -> None:
    out["metrics_md"] = str(Path(manifest["folder"]) / "metrics.md")
    run_page.evaluation(manifest)


def _report_champion(reg: dict[str, Any], out: dict[str, Any], parent: ParentRun) -> None:
    out["registered"] = {
        k: reg[k]
        for k in (
            *("model_name", "alias", "version", "variant", "seed", "n_seeds", "metric", "value"),
            *("beats_baseline", "beats_baseline_95ci"),
        )
    }
    out["registered"]["onnx_export"] = bool(reg.get("onnx", {}).get("attached", True))
    run_page.champion(out["registered"])
    parent.tag({"champion": f"{reg['variant']} (version {reg['version']})"})


# What the run reports beyond its stages' folders, after a stage has finished (a stage without an entry
# reports nothing more).
_REPORTS: dict[str, Callable[[Any, dict[str, Any], ParentRun], None]] = {
    "evaluate": _report_evaluation,
    "register": _report_champion,
}
