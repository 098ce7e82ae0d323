"""``colorize ui``: the MLflow UI and the Prefect UI for one work dir, on 127.0.0.1 by default.

Both read the work dir's own stores (``mlflow.db``, ``.prefect/``). Ctrl-C stops both.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.env import configure, stop_on_sigterm
from storage.tracking import tracking_uri


def commands(workdir: Path, host: str, mlflow_port: int, prefect_port: int) -> dict[str, list[str]]:
    bindir = Path(sys.executable).parent
    return {
        "mlflow": [
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
        ],
        "prefect": [str(bindir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
    }


def exposure_warning(host: str, what: str = "both UIs") -> str | None:
    """What to tell a user who binds ``what`` beyond this machine, or None for a loopback address."""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
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
    # Explicit handlers: a process started in the background inherits SIGINT as ignored, and a
    # supervisor stops with SIGTERM; both must take the two servers down with us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_on_sigterm()
    env = dict(os.environ)
    procs = {
        name: subprocess.Popen(cmd, env=env, start_new_session=True)
        for name, cmd in commands(workdir, host, mlflow_port, prefect_port).items()
    }
    print(f"MLflow UI:  http://{host}:{mlflow_port}  (store: {tracking_uri(workdir)})")
    print(f"Prefect UI: http://{host}:{prefect_port}  (PREFECT_HOME: {env['PREFECT_HOME']})")
    print("Ctrl-C stops both.")
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in procs.items() if p.poll() is not None]
        print(f"error: {', '.join(dead)} exited (port in use?)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping...")
        return 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
