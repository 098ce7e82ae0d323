"""Point Prefect and MLflow at the work dir, before either is imported, and keep its temporary Prefect
server from outliving the run.

Prefect reads its settings (home, database, result storage) when first imported, so this must run
first: ``colorize`` keeps every piece of state inside the work dir, nothing in the home folder, and
turns telemetry off. A value the user already exported wins (a shared Prefect server). MLflow's store is
not set here but per call (storage.tracking), so one process can serve several work dirs.

Without a configured server, Prefect starts a temporary one per run and stops it at exit. A SIGTERM or
a SIGHUP (a closed terminal) would skip that (Python's default is to die at once), so
:func:`stop_on_signals` turns each into an ordinary interrupt; a SIGKILL cannot be caught, so the next
run stops the orphan it left (:func:`stop_orphaned_servers`), recognised by its work dir. The servers
``ui``/``serve`` start run in their own sessions (Ctrl-C in the terminal must not reach them half-way):
:func:`start_server` and :func:`stop_server` start and end them, and a child also gets SIGTERM when the
command itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from flows.run_page import STAGE_LOGGERS
from storage.errors import ConfigError

_SERVER_APP = b"prefect.server.api.server:create_app"


def configure(workdir: Path) -> None:
    workdir = workdir.resolve()
    defaults = {
        "PREFECT_HOME": str(workdir / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # The stages' own loggers also go to the flow run's page (Prefect's API handler), still printed
        # once here by the root logger; outside a run (the CLI's own lines) they are not sent, silently.
        "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(STAGE_LOGGERS),
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # Without a server configured, each run starts a temporary one; on a loaded 2-core machine, or with
        # two runs starting at once, that takes longer than Prefect's default 20 s.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DO_NOT_TRACK": "1",
        # Gradio's analytics and version check, and huggingface_hub's telemetry, ignore DO_NOT_TRACK.
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ["COLORIZE_WORKDIR"] = str(workdir)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """Ctrl-C, SIGTERM (a supervisor, ``kill``) and SIGHUP (a closed terminal) all end the command like
    Ctrl-C, so its ``finally`` blocks and exit handlers run and stop the servers it started. SIGINT is set
    too: a command started in the background inherits it as ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


def port_problem(host: str, port: int) -> str | None:
    """Why a server cannot listen on ``host:port`` (out of range, in use, no such address), or None."""
    if not 1 <= port <= 65535:
        return f"port {port} is out of range (1-65535)"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot bind to host {host!r} ({exc})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use; choose another with --port"
            return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None


def require_free_port(host: str, port: int, flag: str = "--port") -> None:
    """Refuse (exit 2, one line) a port a server could not listen on, before anything starts."""
    problem = port_problem(host, port)
    if problem:
        raise ConfigError(f"{flag} {port}: {problem}")


_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux/glibc: the signal handlers alone stop the children
    _LIBC = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def project_pythonpath(env: dict[str, str]) -> str:
    """PYTHONPATH for a server that imports this project's modules (an app factory), wherever it starts."""
    return os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p)


def start_server(cmd: list[str], env: dict[str, str], **kw: object) -> subprocess.Popen:
    """A server in its own session (the terminal's Ctrl-C reaches only us; we stop it in order), which
    still gets SIGTERM if this process is killed without a chance to stop it (Linux)."""
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent, **kw)  # noqa: PLW1509


def stop_server(*procs: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to each server's whole process group (uvicorn's and gunicorn's workers too), all at once so
    they shut down side by side within one ``grace``, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers that outlived their parent
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


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


def writable_dir(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: permission bits say nothing for root or a
    read-only mount)."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def require_workdir(workdir: Path, writable: bool = False) -> None:
    """Refuse (exit 2) a folder that holds no work dir, before a command that only reads one starts a
    server that would create stores (``mlflow.db``, ``.prefect/``) in it; ``writable``: the servers write
    their databases there, so a read-only work dir is said to be one, not found out as a dead server."""
    from storage.tracking import shared_server

    has_store = (workdir / "mlflow.db").is_file() or (shared_server() and (workdir / ".prefect").is_dir())
    if not (has_store or any(workdir.glob("*/last.json"))):
        raise ConfigError(
            f"{workdir} is not a work dir (no mlflow.db, no stage folders); "
            f"run `colorize run --workdir {workdir}` first, or pass the work dir with --workdir"
        )
    if writable and not writable_dir(workdir):
        raise ConfigError(
            f"work dir {workdir} is read-only, and the MLflow and Prefect UIs write their databases in it; "
            "copy it somewhere writable (the copy works as it is) and run `colorize ui` there"
        )


def open_registry(workdir: Path) -> None:
    """Open the work dir's MLflow registry the one way every command must (storage.tracking.client): a
    moved or copied work dir's artifact locations are re-pointed into it first. An absent local store
    is left absent (the caller says there is no model), never created; a shared server needs nothing."""
    from storage.tracking import client, shared_server, store_missing

    if not store_missing(workdir) and not shared_server():
        client(workdir)


def require_prefect_api(timeout: float = 10.0) -> None:
    """With ``PREFECT_API_URL`` set, refuse (exit 2, one line) a URL where no Prefect server answers,
    before the flow starts: Prefect itself reports it as a long traceback from deep in its client."""
    import urllib.error
    import urllib.request

    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        return
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):  # a server that wants credentials is there; Prefect sends them
            reason = f"HTTP {exc.code} from {url}/health"
        else:
            return
    except (OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", None) or exc)
    from storage.redact import redact_text

    url, reason = redact_text(url), redact_text(reason)
    raise ConfigError(
        f"PREFECT_API_URL={url}: no Prefect server answers there ({reason}); start it, fix the URL, "
        "or unset PREFECT_API_URL to let each run start its own"
    )
