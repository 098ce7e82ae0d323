"""Where a stage's per-shard jobs run: here, one after another (``local``, the default), or as one Prefect
task per shard on a Dask cluster (``dask``, through prefect-dask's ``PrefectDaskClient``).

Why per shard on Dask and not per stage: the expensive stages (Real-ESRGAN on 60,000 CIFAR images is
about 5.5 hours on one CPU machine) are embarrassingly parallel over shards. Each shard job writes its
output shard into the stage's partial folder (renamed into place when complete, so a finished shard
survives any crash), and the stage process assembles the manifest as it always does: the stage folder
does not depend on the runner, only the wall time does. Every shard is a Prefect task run of the flow, so
the UI shows each one; Dask reschedules a shard whose worker died, and a rerun of the stage redoes only
the shards that never finished.

The workers need the flow's Prefect API (``PREFECT_API_URL``): without it every worker process would
start its own temporary server on its own database, and the shard runs would be lost to the UI (and
startup would cost seconds per worker). The pipeline refuses ``runner.kind=dask`` without one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from storage import locations, progress
from storage.errors import ConfigError
from storage.settings import Section, flow_setting
from storage.stage import StageResult, run_stage

T = TypeVar("T")
R = TypeVar("R")
API_ENV = "PREFECT_API_URL"


class Settings(Section):
    """The runner section: where per-shard jobs (upscale, prepare) run. Not part of any stage's key: the
    outputs are the same wherever they are computed."""

    kind: Literal["local", "dask"] = flow_setting("local", description="local: in this process; dask: a Dask cluster")
    address: str | None = flow_setting(
        None, description="dask: the scheduler (tcp://host:8786); unset starts a LocalCluster for each stage"
    )
    workers: int = flow_setting(2, ge=1, le=1024, description="dask without an address: LocalCluster worker processes")


@dataclass(frozen=True)
class ShardJob:
    """One input shard of a stage: what a shard job receives, here or on a worker (picklable)."""

    plan: dict[str, Any]
    out: str  # the stage's partial folder, or its exchange prefix in the stage store
    split: str
    shard: str  # a path in the work dir, or the URL of the stage store's copy
    sha256: str | None = field(default=None, kw_only=True)  # a URL's content, checked before use

    @property
    def index(self) -> int:
        """The input shard's number (``<prefix>-<split>-NNNNNN.tar``)."""
        return int(Path(self.shard).stem.rsplit("-", 1)[1])


def check(settings: Settings) -> None:
    """Refuse a Dask run the workers could not report to (see the module docstring)."""
    if settings.kind == "dask" and not os.environ.get(API_ENV):
        raise ConfigError(
            f"runner.kind=dask needs a Prefect server its workers can reach: start one "
            f"(prefect server start --host 127.0.0.1) and export {API_ENV}=http://127.0.0.1:4200/api "
            "here and on every worker machine"
        )


def exchange(runner: dict[str, Any] | None, store: str | None, stage: str, key: str) -> str | None:
    """Where the shard jobs of a stage put their outputs: None for the stage's partial folder (the local
    runner, or Dask without a stage store, whose workers then share the work dir's file system), else
    ``<store>/<stage>/<key>.partial``, so workers on other machines need only the store."""
    if Settings.model_validate(runner or {}).kind == "local" or not store:
        return None
    return f"{store.rstrip('/')}/{stage}/{key}.partial"


def run_exchanged(
    plan: dict[str, Any], work: Callable[[Path], Mapping[str, Any]], force: bool, remote: str | None
) -> StageResult:
    """``run_stage`` for a stage whose shard jobs meet in the exchange prefix ``remote`` (see
    :func:`exchange`): with ``force`` the prefix is cleared under the stage lock, like the partial
    folder; once the stage is finished it is removed (best effort)."""

    def exchanged(out: Path) -> Mapping[str, Any]:
        if force and remote:
            locations.remove_folder(remote, best_effort=False)
        return work(out)

    result = run_stage(plan, exchanged, force=force)
    if remote:
        locations.remove_folder(remote)
    return result


def source(manifest: dict[str, Any], path: Path | str, store: str | None) -> dict[str, Any]:
    """A shard job's input (``shard`` and ``sha256`` of a ShardJob): the work dir's file, or with a
    ``store`` the store's copy of it (the flow publishes each stage before the next one starts), with
    the sha256 its manifest records, which the worker checks before reading it."""
    if store is None:
        return {"shard": str(path)}
    name = Path(path).name
    url = f"{store.rstrip('/')}/{manifest['stage']}/{manifest['key']}/{name}"
    return {"shard": url, "sha256": manifest["files"][name]["sha256"]}


def map_shards(runner: dict[str, Any] | None, fn: Callable[[T], R], jobs: Sequence[T], names: Sequence[str]) -> list[R]:
    """``[fn(job) for job in jobs]``, in this process or as Prefect tasks on Dask (named ``names``).
    ``fn`` must be a module-level function and the jobs picklable: they travel to the workers."""
    settings = Settings.model_validate(runner or {})
    if settings.kind == "local" or not jobs:
        results = []
        for i, (job, name) in enumerate(zip(jobs, names, strict=True)):
            results.append(fn(job))
            progress.report(i + 1, len(jobs), f"{i + 1} of {len(jobs)} shards ({name} done)")
        return results
    check(settings)
    return _on_dask(settings, fn, jobs, names)


def _on_dask(settings: Settings, fn: Callable[[T], R], jobs: Sequence[T], names: Sequence[str]) -> list[R]:
    from distributed import LocalCluster
    from prefect import task
    from prefect_dask import PrefectDaskClient

    shard_task = task(_call, name="shard", retries=0)
    cluster = None
    address = settings.address
    if address is None:
        # Processes, not threads: the shard jobs hold the GIL in places (PNG coding) and set torch's
        # thread count. One thread each: the engines use the cores themselves.
        cluster = LocalCluster(
            n_workers=settings.workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        )
        address = cluster.scheduler_address
    try:
        with PrefectDaskClient(address) as client:
            futures = [
                client.submit(shard_task.with_options(task_run_name=name), fn, job, pure=False)
                for job, name in zip(jobs, names, strict=True)
            ]
            return client.gather(futures)
    finally:
        if cluster is not None:
            cluster.close()


def _call(fn: Callable[[T], R], job: T) -> R:
    return fn(job)
