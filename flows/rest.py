"""``colorize serve``: the registered champion as a REST API, through MLflow's own scoring server.

``mlflow models serve --env-manager local`` execs ``uvicorn`` by name, so it fails (``exec uvicorn ...
returned 127``) unless the environment's ``bin/`` is on ``PATH``; and it must be told the work dir's
registry. This command does both, binds to 127.0.0.1 by default, and stops the server on Ctrl-C or
SIGTERM. Requests: ``POST /invocations`` with ``{"inputs": <uint8 array (B, H, W, 3)>}``; the answer is
``{"predictions": <uint8 array, same shape>}``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from flows.env import stop_on_sigterm
from storage.tracking import tracking_uri

DEFAULT_MODEL = "models:/colorizer@champion"


def command(model: str, host: str, port: int) -> list[str]:
    mlflow = Path(sys.executable).parent / "mlflow"
    return [str(mlflow), "models", "serve", "-m", model, "--env-manager", "local", "-h", host, "-p", str(port)]


def environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking_uri(workdir)
    return env


def serve(workdir: Path, model: str | None, host: str, port: int) -> int:
    from flows.ui import exposure_warning

    warning = exposure_warning(host, "the REST API")
    if warning:
        print(warning, file=sys.stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_on_sigterm()
    proc = subprocess.Popen(
        command(model or DEFAULT_MODEL, host, port), env=environment(workdir), start_new_session=True
    )
    print(f'REST API: http://{host}:{port}/invocations  (POST {{"inputs": uint8 (B,H,W,3)}}; GET /ping)')
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
