"""``colorize ui``: the MLflow UI and the Prefect UI for one work dir, on 127.0.0.1 by default.

Both read the work dir's own stores (``mlflow.db``, ``.prefect/``). Ctrl-C, SIGTERM and SIGHUP stop both.
A web page on another origin must not drive either API from the user's browser (Prefect's defaults allow
any origin and any Host header: a page could read flow-run parameters or delete runs), so each server
accepts only its own origin and Host names: MLflow through its ``--allowed-hosts`` and
``--cors-allowed-origins``; Prefect through its CORS and CSRF settings and, as it has no Host check of its
own, a Starlette ``TrustedHostMiddleware`` around its app (:func:`prefect_app`).
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path
from typing import Any

from flows.env import configure, project_pythonpath, start_server, stop_on_signals, stop_server
from storage.tracking import tracking_uri

ALLOWED_HOSTS_ENV = "COLORIZE_PREFECT_ALLOWED_HOSTS"


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def host_names(host: str) -> list[str]:
    """The names a browser may use to reach a server bound to ``host`` (an empty list: any, for a wildcard
    bind the user chose to expose, where the reaching name cannot be known)."""
    if _wildcard(host):
        return []
    names = [host, "localhost", "127.0.0.1"] if _loopback(host) else [host]
    return [f"[{n}]" if ":" in n else n for n in dict.fromkeys(names)]


def origins(host: str, port: int) -> list[str]:
    return [f"http://{name}:{port}" for name in host_names(host)]


def commands(workdir: Path, host: str, mlflow_port: int, prefect_port: int) -> dict[str, list[str]]:
    bindir = Path(sys.executable).parent
    mlflow = [
        str(bindir / "mlflow"),
        "ui",
        "--backend-store-uri",
        tracking_uri(workdir),
        "--default-artifact-root",
        (workdir / "mlartifacts").as_uri(),
        "--host",
        host,
        "--port",
        str(mlflow_port),
        "--workers",
        "1",
    ]
    if host_names(host):
        hosts = ",".join(f"{n}:{mlflow_port}" for n in host_names(host))
        mlflow += ["--allowed-hosts", hosts, "--cors-allowed-origins", ",".join(origins(host, mlflow_port))]
    prefect = [sys.executable, "-m", "uvicorn", "--factory", f"{__name__}:prefect_app"]
    prefect += ["--host", host, "--port", str(prefect_port)]
    return {"mlflow": mlflow, "prefect": prefect}


def prefect_environment(host: str, port: int) -> dict[str, str]:
    """Prefect's settings for its server on ``host:port``: only its own origin may call the API from a
    browser, and state-changing calls need a CSRF token (which its own UI fetches)."""
    own = origins(host, port)
    return {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(own) if own else "*",
        "PREFECT_SERVER_CORS_ALLOWED_METHODS": "GET,POST,PUT,PATCH,DELETE,OPTIONS",
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
        "PREFECT__SERVER_FINAL": "1",
        ALLOWED_HOSTS_ENV: ",".join(host_names(host)) or "*",
    }


def prefect_app() -> Any:
    """uvicorn's factory (in the server process): Prefect's app, refusing (400) any Host header but its
    own names, so a DNS-rebinding page cannot reach it as a 'same-origin' one."""
    from prefect.server.api.server import create_app
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    allowed = os.environ.get(ALLOWED_HOSTS_ENV, "127.0.0.1").split(",")
    return TrustedHostMiddleware(create_app(final=True), allowed_hosts=allowed)


def exposure_warning(host: str, what: str = "both UIs") -> str | None:
    """What to tell a user who binds ``what`` beyond this machine, or None for a loopback address."""
    if _loopback(host):
        return None
    return (
        f"WARNING: binding to {host} exposes {what} beyond this machine, with no authentication: "
        "anyone who can reach this address can read every run, parameter and model, and change them. "
        "Use 127.0.0.1 with an SSH tunnel, or put an authenticating proxy in front."
    )


def serve(workdir: Path, host: str, mlflow_port: int, prefect_port: int) -> int:
    configure(workdir)
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    # Every stopping signal (Ctrl-C, a supervisor's SIGTERM, a closed terminal's SIGHUP) must take the two
    # servers down with us: they run in their own sessions, so nothing else reaches them.
    stop_on_signals()
    env = dict(os.environ)
    env["PYTHONPATH"] = project_pythonpath(env)
    cmds = commands(workdir, host, mlflow_port, prefect_port)
    procs = {}
    try:
        procs["mlflow"] = start_server(cmds["mlflow"], env)
        procs["prefect"] = start_server(cmds["prefect"], {**env, **prefect_environment(host, prefect_port)})
        print(f"MLflow UI:  http://{host}:{mlflow_port}  (store: {tracking_uri(workdir)})")
        print(f"Prefect UI: http://{host}:{prefect_port}  (PREFECT_HOME: {env['PREFECT_HOME']})")
        print("Ctrl-C stops both.", flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [f"{n} (exit code {p.returncode})" for n, p in procs.items() if p.poll() is not None]
        print(f"error: {', '.join(dead)} exited; see its messages above", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping...")
        return 0
    finally:
        stop_server(*procs.values())
