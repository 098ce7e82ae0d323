"""MLflow in the work dir: a sqlite tracking store (``mlflow.db``) and an artifact root beside it.

Everything goes through an explicit ``MlflowClient`` and run ids, never the fluent API's global active
run, so stages running in Prefect worker threads cannot log into each other's runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from storage.redact import redact

log = logging.getLogger(__name__)
EXPERIMENT = "colorize"


def shared_server() -> bool:
    """Whether runs go to a store named by ``COLORIZE_MLFLOW_URI`` instead of the work dir's own."""
    return bool(os.environ.get("COLORIZE_MLFLOW_URI"))


def tracking_uri(workdir: Path) -> str:
    """The work dir's sqlite store, unless ``COLORIZE_MLFLOW_URI`` names a shared server (e.g. PostgreSQL-backed)."""
    return os.environ.get("COLORIZE_MLFLOW_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def store_missing(workdir: Path) -> bool:
    """The work dir's own sqlite store does not exist (yet): a command that only reads the registry says
    so instead of letting MLflow create an empty ``mlflow.db``. A shared server is never missing here."""
    return tracking_uri(workdir).startswith("sqlite:///") and not (Path(workdir) / "mlflow.db").is_file()


def use_store(workdir: Path) -> str:
    """Point this process's MLflow (its module-level API: ``mlflow.pyfunc.load_model``,
    ``mlflow.artifacts``, ``mlflow.register_model``, a bare ``MlflowClient()``) at the work dir's store,
    tracking and registry alike, and return its URI: the one place a tracking location is set. An
    existing local store is opened through :func:`client` first (a moved or copied work dir's artifact
    locations re-pointed into it); an absent one is left absent, never created here. A separate process
    (the REST server) is told with ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` = :func:`tracking_uri`."""
    if not store_missing(workdir) and not shared_server():
        client(workdir)
    import mlflow

    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def warn_if_locked(uri: str) -> bool:
    """Say so when another process holds the sqlite store's write lock. MLflow itself waits up to 20 s
    (its busy_timeout) and retry_locked waits longer, but silently stalling would look like a hang."""
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.is_file():
        return False
    con = sqlite3.connect(path, timeout=0)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.rollback()
        return False
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        log.warning("%s is locked by another process; waiting for it", path)
        return True
    finally:
        con.close()


_READY: set[str] = set()


def client(workdir: Path) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(workdir)
    warn_if_locked(uri)
    from mlflow.tracking import MlflowClient

    if uri not in _READY:
        # MLflow creates and migrates a new sqlite store when a client first touches it, and two processes
        # doing that at once break alembic's migration: a file lock in the work dir makes it one at a time.
        lock = Path(workdir).resolve() / ".mlflow-init.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                c = MlflowClient(tracking_uri=uri, registry_uri=uri)
                c.search_experiments(max_results=1)
                c.search_registered_models(max_results=1)
                if uri.startswith("sqlite:///"):
                    relocate(Path(uri.removeprefix("sqlite:///")), Path(workdir).resolve())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        _READY.add(uri)
        return c
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# Where mlflow.db keeps absolute artifact locations (MLflow 3's schema); columns missing in another
# version of the schema are skipped.
_LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def relocate(db: Path, workdir: Path) -> None:
    """Point the store's artifact locations into this work dir when it was moved or copied.

    mlflow.db records absolute ``file://`` locations: a copied work dir would write new models into the
    original's ``mlartifacts/``, and a moved one would find none. Only the work dir's own artifact root
    (``<old workdir>/mlartifacts``) is rewritten; a location the user chose elsewhere is left alone.
    """
    new_root = (workdir / "mlartifacts").as_uri()
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
            if row is None or row[0] == new_root or not str(row[0]).endswith("/mlartifacts"):
                return
            old_root = row[0]
            for table, column in _LOCATIONS:
                columns = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                if column in columns:
                    con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (new_root, len(old_root) + 1, len(old_root), old_root),
                    )
        log.warning("this work dir was moved or copied: MLflow artifact locations now point into %s", new_root)
    finally:
        con.close()


def retry_locked(fn: Any, *args: Any, attempts: int = 30, delay: float = 0.5, **kw: Any) -> Any:
    """Call ``fn``, waiting out 'database is locked' from another process holding mlflow.db."""
    for i in range(attempts):
        try:
            return fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - MLflow wraps sqlite errors in several types
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            if i == 0:
                log.warning("mlflow.db is still locked by another process; retrying for up to %.0f s", attempts * delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Tracker:
    """One MLflow handle for one stage run: the client is built (and the store checked) once, not per
    call; every call names its run id, so stages in worker threads never log into each other's runs."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.client = client(self.workdir)

    def experiment_id(self, name: str = EXPERIMENT) -> str:
        c = self.client
        exp = retry_locked(c.get_experiment_by_name, name)
        if exp is not None:
            return exp.experiment_id
        # The work dir's own store keeps its artifacts beside it. A shared server decides where artifacts go
        # (with --serve-artifacts: through the server): a client path would be a folder on this machine
        # that no other machine, and not the server, can read.
        root = None if shared_server() else (self.workdir.resolve() / "mlartifacts").as_uri()
        try:
            return retry_locked(c.create_experiment, name, artifact_location=root)
        except Exception:  # another run created it first
            return retry_locked(c.get_experiment_by_name, name).experiment_id

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {k: redact(k, v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = retry_locked(self.client.create_run, self.experiment_id(), run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, redact(k, v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(batch), 100):
            retry_locked(self.client.log_batch, run_id, params=batch[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            retry_locked(self.client.log_batch, run_id, metrics=batch)

    def log_artifact(self, run_id: str, path: Path, subdir: str | None = None) -> None:
        retry_locked(self.client.log_artifact, run_id, str(path), subdir)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            retry_locked(self.client.set_tag, run_id, k, redact(k, v))

    def run_exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MLflow raises several types for "no such run"
            return False
        return True

    def version_intact(self, name: str, alias: str, version: int) -> bool:
        """The registry's ``name@alias`` is ``version`` and its files are there (a local store: the
        model's folder with its MLmodel file; a server is trusted to hold what it registered)."""
        try:
            found = self.client.get_model_version_by_alias(name, alias)
        except Exception:  # noqa: BLE001 - no registry, no model, no alias: all mean "not intact"
            return False
        if int(found.version) != version:
            return False
        location = getattr(found, "storage_location", None) or ""
        if location.startswith("file://"):
            from urllib.parse import unquote, urlparse

            return (Path(unquote(urlparse(location).path)) / "MLmodel").is_file()
        return True

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        with contextlib.suppress(Exception):
            retry_locked(self.client.set_terminated, run_id, status)


def flatten(prefix: str, obj: Any) -> dict[str, Any]:
    """Nested config -> flat ``a.b.c`` params."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: obj}
