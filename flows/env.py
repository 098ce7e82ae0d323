"""Point Prefect and MLflow at the work dir, before either is imported, and keep its temporary Prefect
server from outliving the run.

Prefect reads its settings (home, database, result storage) when first imported, so this must run
first: ``colorize`` keeps every piece of state inside the work dir, nothing in the home folder, and
turns telemetry off. A value the user already exported wins (a shared Prefect server). MLflow's store is
not set here but per call (storage.tracking), so one process can serve several work dirs.

Without a configured server, Prefect starts a temporary one per run and stops it at exit. A SIGTERM
would skip that (Python's default is to die at once), so :func:`stop_on_sigterm` turns it into an
ordinary interrupt; a SIGKILL cannot be caught, so the next run stops the orphan it left
(:func:`stop_orphaned_servers`), recognised by its work dir.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

_SERVER_APP = b"prefect.server.api.server:create_app"


def configure(workdir: Path) -> None:
    workdir = workdir.resolve()
    defaults = {
        "PREFECT_HOME": str(workdir / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # Without a server configured, each run starts a temporary one; on a loaded 2-core machine, or with
        # two runs starting at once, that takes longer than Prefect's default 20 s.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DO_NOT_TRACK": "1",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ["COLORIZE_WORKDIR"] = str(workdir)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (a supervisor, ``kill``) ends the run like Ctrl-C: exit handlers run and stop the server."""
    signal.signal(signal.SIGTERM, _interrupt)


def _environ(pid: int) -> dict[bytes, bytes]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.partition(b"=")[::2] for item in raw.split(b"\0") if item)


def prefect_servers(workdir: Path) -> list[int]:
    """Pids of temporary Prefect servers whose home is this work dir's (Linux /proc; elsewhere none)."""
    home = str(workdir.resolve() / ".prefect").encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if _SERVER_APP not in (entry / "cmdline").read_bytes():
                continue
            env = _environ(int(entry.name))
            if env.get(b"PREFECT_HOME") == home and env.get(b"PREFECT__SERVER_EPHEMERAL") == b"1":
                found.append(int(entry.name))
    return sorted(found)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def stop_orphaned_servers(workdir: Path, grace: float = 10.0) -> list[int]:
    """Stop this work dir's temporary servers whose run is gone (a SIGKILLed ``colorize run``); a server
    whose parent is a live run on the same work dir is left alone. Returns the pids stopped."""
    home = str(workdir.resolve() / ".prefect").encode()
    orphans = []
    for pid in prefect_servers(workdir):
        with contextlib.suppress(OSError, ValueError):
            parent = _parent(pid)
            alive_run = parent > 1 and _environ(parent).get(b"PREFECT_HOME") == home
            if not alive_run:
                os.kill(pid, signal.SIGTERM)
                orphans.append(pid)
    deadline = time.time() + grace
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in orphans):
        time.sleep(0.2)
    for pid in orphans:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return orphans
