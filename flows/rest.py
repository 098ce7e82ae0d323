"""``colorize serve``: the registered champion as a REST API, through MLflow's own scoring server.

The model is resolved here, through the same registry path as every other command
(:func:`storage.tracking.use_store`, which re-points a moved or copied work dir's artifact locations), so
a copied work dir serves its own files, and the device is checked as the loader checks it
(model.loading.Running.where). The server is another process, told the store, the model's device and
precision in its environment (:func:`environment`): MLflow's scoring app (``mlflow models serve`` runs
the same one) behind :class:`PayloadGuard`, run by uvicorn on 127.0.0.1 by default, and stopped with this
command on Ctrl-C, SIGTERM or SIGHUP. Requests: ``POST /invocations`` with ``{"inputs": <uint8 array
(B, H, W, 3)>}``; the answer is ``{"predictions": <uint8 array, same shape>}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from flows.env import project_pythonpath, start_server, stop_on_signals, stop_server
from model.choices import DEFAULT_MODEL
from storage.errors import ConfigError
from storage.tracking import store_missing, tracking_uri, use_store

MODEL_PATH_ENV = "COLORIZE_SERVE_MODEL_PATH"
EXPECTED = "expected uint8 pixel values: whole numbers in 0..255, shape (B, H, W, 3) or (B, H, W)"
_ARRAY_KEYS = ("inputs", "instances")


def resolve_model(workdir: Path, model: str | None, dst: Path) -> str:
    """The local folder of ``model`` (default: the champion) in this work dir's registry. A user's mistake
    (no store, no such model) is a :class:`ConfigError`; an empty folder never gets an ``mlflow.db``."""
    target = model or DEFAULT_MODEL
    if store_missing(workdir):
        raise ConfigError(
            f"{workdir} has no MLflow store (mlflow.db): not a work dir, or no run yet; train a model with "
            f"`colorize run --dataset sample --workdir {workdir}`"
        )
    uri = use_store(workdir)  # as every command opens it: a moved work dir is re-pointed here
    import mlflow

    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=str(dst)))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for "not there"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--model {target}: cannot load it from {uri} ({first})") from None
    if not (path / "MLmodel").is_file():
        raise ConfigError(f"--model {target}: {path} holds no MLmodel file")
    return str(path)


def command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--factory", f"{__name__}:create_app", "--host", host, "--port", str(port)]


def payload_problem(body: bytes, content_type: str, params: frozenset[str] = frozenset()) -> tuple[int, str] | None:
    """The status and one-line reason a ``/invocations`` request must be refused with before MLflow sees
    it, or None to let MLflow parse it. MLflow casts the payload to the signature's uint8 itself (0.47 ->
    0, 120.7 -> 120, and answers 200), a deeply nested body crashes its parser (500), a request with no
    Content-Type is a 500 with a traceback, and a parameter absent from the signature (``vividness`` to a
    regression-head model) is dropped with a 200: none reaches ``predict`` as it was sent. ``params``:
    the names the model's signature takes."""
    kind = content_type.split(";")[0].strip().lower()
    if not kind:
        return 415, f'no Content-Type: send Content-Type: application/json with {{"inputs": ...}}; {EXPECTED}'
    if kind != "application/json":
        return None
    try:
        data = json.loads(body)
    except RecursionError:
        return 400, f"the JSON is nested too deeply; {EXPECTED}"
    except ValueError:  # not JSON: MLflow's own 400 says so
        return None
    if not isinstance(data, dict):
        return None
    given = data.get("params")
    if isinstance(given, dict) and (unknown := sorted(set(given) - params)):
        takes = f"it takes {', '.join(sorted(params))}" if params else "it takes none"
        why = " (vividness is for a classification-head model)" if "vividness" in unknown and not params else ""
        return 400, f"params {', '.join(map(repr, unknown))}: not a parameter of this model{why}; {takes}"
    problem = _array_problem(data)
    return None if problem is None else (400, problem)


def _array_problem(data: dict) -> str | None:
    import numpy as np

    for key in _ARRAY_KEYS:
        if key not in data:
            continue
        try:
            array = np.asarray(data[key])
        except (ValueError, RecursionError):
            return f"{key!r} is not a rectangular array; {EXPECTED}"
        if array.dtype.kind in "fcb":
            return f"{key!r} holds {'booleans' if array.dtype.kind == 'b' else 'fractional numbers'}; {EXPECTED}"
        if array.dtype.kind == "O":
            return f"{key!r} is not a rectangular array of numbers; {EXPECTED}"
        if array.dtype.kind in "iu" and array.size and (array.min() < 0 or array.max() > 255):
            return f"{key!r} holds values outside 0..255 ({array.min()}..{array.max()}); {EXPECTED}"
    return None


class PayloadGuard:
    """ASGI wrapper around MLflow's scoring app: reads a ``POST /invocations`` body once, answers 4xx
    (MLflow's error JSON, ``INVALID_PARAMETER_VALUE``) for :func:`payload_problem`, else replays it.
    ``params``: the parameter names the served model's signature takes."""

    def __init__(self, app: Any, params: frozenset[str] = frozenset()) -> None:
        self.app, self.params = app, params

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = payload_problem(body, headers.get("content-type", ""), self.params)
        if refusal:
            status, problem = refusal
            answer = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": problem}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": answer})
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app() -> Any:
    """uvicorn's factory (in the server process): MLflow's scoring app for the model folder in the
    environment, behind :class:`PayloadGuard`."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_PATH_ENV])
    schema = model.metadata.get_params_schema()
    params = frozenset(p.name for p in schema.params) if schema is not None else frozenset()
    return PayloadGuard(scoring_server.init(model), params)


def environment(workdir: Path, model_path: str, device: str = "auto", precision: str = "fp32") -> dict[str, str]:
    from model.inference import DEVICE_ENV, PRECISION_ENV

    env = dict(os.environ)
    env[DEVICE_ENV], env[PRECISION_ENV] = device, precision  # where and how the model's pyfunc runs its network
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking_uri(workdir)
    env[MODEL_PATH_ENV] = model_path
    env["PYTHONPATH"] = project_pythonpath(env)  # flows.rest, model.pyfunc import in the server
    return env


def serve(workdir: Path, model: str | None, host: str, port: int, device: str = "auto", precision: str = "fp32") -> int:
    """Resolve the model and the device (a mistake: exit 2 before anything starts), then run the server
    until it exits or a stopping signal ends this command, and take the server down with it."""
    from flows.ui import exposure_warning
    from model.loading import Running

    Running(device=device, precision=precision).where()  # the loader's own check: a ConfigError, exit 2
    # The model's files, copied out of the store, live as long as this command (a copy of the whole
    # model, ~240 MB with its encoders: one left in /tmp per `serve` adds up)
    with tempfile.TemporaryDirectory(prefix="colorize-serve-") as tmp:
        model_path = resolve_model(workdir, model, Path(tmp))
        warning = exposure_warning(host, "the REST API")
        if warning:
            print(warning, file=sys.stderr)
        stop_on_signals()
        proc = start_server(command(host, port), environment(workdir, model_path, device, precision))
        print(
            f'REST API: http://{host}:{port}/invocations  (POST {{"inputs": uint8 (B,H,W,3)}}; GET /ping)', flush=True
        )
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_server(proc)
