"""The servers a user starts (``colorize serve``, ``ui``, ``app``) as a user meets them: started as real
processes on 127.0.0.1, refusing bad payloads and foreign web pages, stopping with every signal that ends
the command, making no network call the user did not ask for, and refusing mistakes in one line.

A registered champion is made directly (an untrained network logged the way the register stage logs
it): seconds instead of the tiny pipeline's minutes, and what it computes does not matter here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import free_port, wait_http
from PIL import Image

from flows.cli import main

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "", None}


def register_untrained(workdir: Path) -> None:
    """``models:/colorizer@champion`` in ``workdir``'s own store: a small untrained colorizer, logged by
    the register stage's own MLflow layer (tasks.register.log_version: models from code, uint8 tensor
    signature), without an ONNX export."""
    import torch

    from model.colorizer import SPEC_FILE, Colorizer, ColorizerSpec, save_trained
    from storage.tracking import Tracker
    from tasks.register import log_version

    folder = workdir / "train" / "model"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_trained(Colorizer(ColorizerSpec(decoder_width=8, image_size=32)).eval(), folder)
    (workdir / "train" / "last.json").write_text(json.dumps({"state": "ran", "key": "k", "seconds": 1.0}))
    tracker = Tracker(workdir)
    scratch = workdir / "scratch"
    scratch.mkdir()
    log_version(
        tracker, tracker.start_run("train-average"), folder, folder / SPEC_FILE, scratch, "colorizer", "champion"
    )
    shutil.rmtree(scratch)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("servers") / "work"
    wd.mkdir()
    register_untrained(wd)
    return wd


@pytest.fixture(scope="module")
def moved_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work dir whose original location is gone: registered in one place, copied, the original deleted
    (a work dir moved to another disk or machine)."""
    original = tmp_path_factory.mktemp("original") / "work"
    original.mkdir()
    register_untrained(original)
    copy = tmp_path_factory.mktemp("copied") / "work"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    return copy


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "COLORIZE_"))}
    return {**env, "DO_NOT_TRACK": "1", **extra}


def _start(argv: list[str], env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    """``colorize ARGV`` as a user runs it, in its own process group (so a test can signal it alone)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=env or _env(), start_new_session=True, **kw
    )


def _family(proc: subprocess.Popen) -> list[psutil.Process]:
    """The command and every process below it (servers in their own sessions included)."""
    me = psutil.Process(proc.pid)
    return [me, *me.children(recursive=True)]


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:150]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _request(
    url: str, body: bytes | None = None, method: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, body, headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@pytest.fixture(scope="module")
def rest_api(workdir: Path) -> Iterator[str]:
    """``colorize serve`` on the work dir."""
    port = free_port()
    proc = _start(["serve", "--workdir", str(workdir), "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    family: list[psutil.Process] = []
    try:
        wait_http(base + "/ping", proc)
        family = _family(proc)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        _kill_all(family)


# ---------------------------------------------------------------- 10: a moved or copied work dir serves itself
@pytest.mark.parametrize("command", ["serve", "app"])
def test_a_copied_work_dir_serves_its_own_model_after_the_original_is_deleted(
    command: str, moved_workdir: Path
) -> None:
    port = free_port()
    proc = _start([command, "--workdir", str(moved_workdir), "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    family: list[psutil.Process] = []
    try:
        wait_http(base + ("/ping" if command == "serve" else "/"), proc)  # the app loads its model first
        family = _family(proc)
        if command == "serve":
            image = np.random.default_rng(0).integers(0, 256, (1, 20, 24, 3)).tolist()
            payload = json.dumps({"inputs": image}).encode()
            status, _, body = _request(base + "/invocations", payload, headers={"Content-Type": "application/json"})
            assert status == 200, body[:500]
            assert np.asarray(json.loads(body)["predictions"]).shape == (1, 20, 24, 3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        _kill_all(family)


# ---------------------------------------------------------------- 6: the REST API refuses what it would garble
@pytest.mark.parametrize(
    "inputs",
    [[[[[0.47, 0.31, 0.24]]]], [[[[120.7, 3, 4]]]], [[[[300, 0, 0]]]], [[[[-1, 0, 0]]]], [[[[True, False, True]]]]],
    ids=["fractions", "float", "above-255", "negative", "booleans"],
)
def test_rest_api_refuses_values_that_are_not_uint8(rest_api: str, inputs: list) -> None:
    status, _, body = _request(
        rest_api + "/invocations", json.dumps({"inputs": inputs}).encode(), headers={"Content-Type": "application/json"}
    )
    assert status == 400, (status, body[:300])
    assert "uint8" in json.loads(body)["message"] and "0..255" in json.loads(body)["message"]


def test_rest_api_answers_a_deeply_nested_payload_with_4xx_and_goes_on(rest_api: str) -> None:
    for deep in (b"[" * 10_000 + b"]" * 10_000, b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"):
        status, _, body = _request(rest_api + "/invocations", deep, headers={"Content-Type": "application/json"})
        assert 400 <= status < 500, (status, body[:300])
    assert _request(rest_api + "/ping")[0] == 200


# ---------------------------------------------------------------- 2: only the servers' own origin
def test_ui_servers_refuse_foreign_origins_and_hosts_and_serve_their_own(workdir: Path) -> None:
    mport, pport = free_port(), free_port()
    proc = _start(["ui", "--workdir", str(workdir), "--mlflow-port", str(mport), "--prefect-port", str(pport)])
    family: list[psutil.Process] = []
    evil = {"Origin": "http://evil.example"}
    try:
        prefect, mlflow = f"http://127.0.0.1:{pport}/api", f"http://127.0.0.1:{mport}"
        wait_http(prefect + "/health", proc)
        wait_http(mlflow + "/health", proc)
        family = _family(proc)

        # Prefect: a foreign page is granted no CORS, cannot POST (CSRF), and a foreign Host is refused
        preflight = {**evil, "Access-Control-Request-Method": "DELETE"}
        status, headers, _ = _request(prefect + "/flow_runs/filter", method="OPTIONS", headers=preflight)
        assert headers.get("access-control-allow-origin") not in ("*", "http://evil.example"), headers
        status, headers, _ = _request(
            prefect + "/flow_runs/filter", b"{}", headers={**evil, "Content-Type": "application/json"}
        )
        assert status == 403 and headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
        assert _request(prefect + "/health", headers={"Host": f"evil.example:{pport}"})[0] == 400
        own = {"Origin": f"http://127.0.0.1:{pport}"}
        status, headers, _ = _request(prefect + "/health", headers=own)
        assert status == 200 and headers.get("access-control-allow-origin") == own["Origin"]
        status, _, body = _request(prefect + "/csrf-token?client=test", headers=own)
        assert status == 200, body
        token = {"Prefect-Csrf-Token": json.loads(body)["token"], "Prefect-Csrf-Client": "test"}
        status, _, body = _request(
            prefect + "/flow_runs/filter", b"{}", headers={**own, **token, "Content-Type": "application/json"}
        )
        assert status == 200, body[:300]

        # MLflow: same, through its own allowlists
        search = mlflow + "/api/2.0/mlflow/experiments/search"
        payload = json.dumps({"max_results": 5}).encode()
        status, headers, _ = _request(search, payload, headers={**evil, "Content-Type": "application/json"})
        assert status == 403 and headers.get("access-control-allow-origin") != "http://evil.example"
        foreign_host = {"Host": f"evil.example:{mport}", "Content-Type": "application/json"}
        assert _request(search, payload, headers=foreign_host)[0] in (400, 403)
        own = {"Origin": f"http://127.0.0.1:{mport}", "Content-Type": "application/json"}
        status, _, body = _request(search, payload, headers=own)
        assert status == 200 and b"colorize" in body, body[:300]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        _kill_all(family)


# ---------------------------------------------------------------- 9: every stopping signal ends the children
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=["HUP", "TERM", "INT"])
@pytest.mark.parametrize("command", ["serve", "ui", "app"])
def test_a_signal_that_ends_the_command_ends_its_servers(command: str, sig: int, workdir: Path, tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    argv = {
        "serve": ["serve", "--port", str(port)],
        "ui": ["ui", "--mlflow-port", str(other), "--prefect-port", str(port)],
        "app": ["app", "--port", str(port)],
    }[command]
    url = f"http://127.0.0.1:{port}" + {"serve": "/ping", "ui": "/api/health", "app": "/"}[command]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = _start([*argv, "--workdir", str(workdir)], _env(TMPDIR=str(scratch)))
    family: list[psutil.Process] = []
    try:
        wait_http(url, proc)
        if command == "ui":
            wait_http(f"http://127.0.0.1:{other}/health", proc)
        family = _family(proc)
        os.kill(proc.pid, sig)
        proc.wait(60)
        deadline = time.monotonic() + 20
        while _alive(family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(family), _alive(family)
        if command == "app":  # its temporary folder (results, uploads) went with it
            assert not list(scratch.glob("colorize-app-*")), list(scratch.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(family)


# ---------------------------------------------------------------- 3: no network call the user did not ask for
AUDIT = """
import json, os, sys

_LOG = os.environ["COLORIZE_TEST_NET_LOG"]


def _hook(event, args):
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        host = args[0]
    elif event in ("socket.connect", "socket.sendto"):
        address = args[-1]
        if not isinstance(address, tuple):  # a unix socket
            return
        host = address[0]
    else:
        return
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    with open(_LOG, "a") as fh:
        fh.write(json.dumps([os.getpid(), event, host]) + "\\n")


with open(_LOG, "a") as fh:  # which processes ran under the hook
    fh.write(json.dumps([os.getpid(), "start", None]) + "\\n")
sys.addaudithook(_hook)
"""


@pytest.mark.parametrize("command", ["app", "serve"])
def test_commands_resolve_and_connect_only_to_loopback(command: str, workdir: Path, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))  # every Python process below loads it
    log = tmp_path / "net.log"
    quiet = ("DO_NOT_TRACK", "GRADIO_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY")
    env = {k: v for k, v in _env().items() if k not in quiet}  # a user who set none of them
    env |= {"PYTHONPATH": str(hook), "COLORIZE_TEST_NET_LOG": str(log)}
    port = free_port()
    proc = _start([command, "--workdir", str(workdir), "--port", str(port)], env)
    family: list[psutil.Process] = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + ("/" if command == "app" else "/ping"), proc)
        family = _family(proc)
        if command == "app":
            assert json.loads(_request(base + "/config")[2])["analytics_enabled"] is False
        else:
            image = json.dumps({"inputs": [[[[1, 2, 3]]]]}).encode()
            assert _request(base + "/invocations", image, headers={"Content-Type": "application/json"})[0] == 200
        time.sleep(3)  # a phone-home thread started at launch has had time to resolve its host
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(family)
    seen = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    started = {pid for pid, event, _ in seen if event == "start"}
    assert len(started) >= (2 if command == "serve" else 1), "the hook did not load in the command and its server"
    calls = [(event, host) for _, event, host in seen if event != "start"]
    foreign = sorted({host for _, host in calls if host not in LOOPBACK and not str(host).startswith("127.")})
    assert not foreign, foreign


# ---------------------------------------------------------------- 11: mistakes are one line, exit 2, nothing started
def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_and_app_refuse_a_busy_or_impossible_port(
    workdir: Path, busy_port: int, capsys: pytest.CaptureFixture
) -> None:
    for command in ("serve", "app"):
        assert "in use" in _one_line_error(capsys, [command, "--workdir", str(workdir), "--port", str(busy_port)])
        assert "out of range" in _one_line_error(capsys, [command, "--workdir", str(workdir), "--port", "99999"])


def test_serve_refuses_an_unknown_model_and_a_folder_that_is_not_a_work_dir(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    monkeypatch.delenv("COLORIZE_MLFLOW_URI", raising=False)
    argv = ["serve", "--workdir", str(workdir), "--model", "models:/nope@x", "--port", str(free_port())]
    err = _one_line_error(capsys, argv)
    assert "models:/nope@x" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    ui = ["ui", "--mlflow-port", str(free_port()), "--prefect-port", str(free_port())]
    for argv in (["serve", "--port", str(free_port())], ui):
        assert "not a work dir" in _one_line_error(capsys, [*argv, "--workdir", str(empty)])
    assert list(empty.iterdir()) == []  # no mlflow.db, no .prefect


def test_ui_on_a_read_only_work_dir_says_so(workdir: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    import flows.env

    monkeypatch.setattr(flows.env, "writable_dir", lambda folder: False)  # a read-only mount (we run as root)
    err = _one_line_error(
        capsys, ["ui", "--workdir", str(workdir), "--mlflow-port", str(free_port()), "--prefect-port", str(free_port())]
    )
    assert "read-only" in err


def test_status_reports_a_malformed_last_json_as_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "last.json").write_text(json.dumps({"state": "ran", "seconds": None, "key": "k"}))
    capsys.readouterr()
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train"))
    assert "unreadable" in row
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".prefect").exists()


def test_run_with_an_unreachable_prefect_api_url_is_one_line(tmp_path: Path) -> None:
    env = _env(PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--workdir", str(tmp_path), "--until", "download"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "PREFECT_API_URL" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "download").exists()  # nothing ran


def test_the_model_itself_refuses_floats_instead_of_casting_them(workdir: Path) -> None:
    """A caller of the pyfunc model's ``predict`` (not through the REST API) gets the same refusal."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from storage.tracking import tracking_uri

    mlflow.set_registry_uri(tracking_uri(workdir))
    model = mlflow.pyfunc.load_model("models:/colorizer@champion").unwrap_python_model()
    for bad in (np.full((1, 8, 8, 3), 0.47), np.full((1, 8, 8, 3), 300, dtype=np.int64)):
        with pytest.raises(MlflowException, match="uint8") as info:
            model.predict(None, bad)
        assert info.value.get_http_status_code() == 400
    assert model.predict(None, np.full((1, 8, 8, 3), 120, dtype=np.int64)).dtype == np.uint8


def test_run_and_image_resolve_and_connect_only_to_loopback(workdir: Path, tmp_path: Path) -> None:
    """The commands that do the work: a pipeline run on the embedded photos (with its own temporary
    Prefect server) and `colorize image` with the registered model. Neither calls out unasked. (Later
    stages fetch the weights their settings ask for, ImageNet's and Real-ESRGAN's, when not cached.)"""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    log = tmp_path / "net.log"
    env = {k: v for k, v in _env().items() if k not in ("DO_NOT_TRACK", "GRADIO_ANALYTICS_ENABLED")}
    env |= {"PYTHONPATH": str(hook), "COLORIZE_TEST_NET_LOG": str(log)}
    photo = tmp_path / "p.png"
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(photo)
    commands = [
        ["run", "--preset", "tiny", "--until", "download", "--workdir", str(tmp_path / "w")],
        ["image", str(photo), "--out", str(tmp_path / "o.png"), "--workdir", str(workdir)],
    ]
    for argv in commands:
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]
    seen = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert seen, "the audit hook recorded nothing: it did not load"
    foreign = sorted({host for _, _, host in seen if host not in LOOPBACK and not str(host).startswith("127.")})
    assert not foreign, foreign
