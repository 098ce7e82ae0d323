"""Shared fixtures: a local HTTP server on 127.0.0.1, small real-format archives, a Prefect harness."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Keep every test's Prefect and MLflow state out of the home folder, before either is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@dataclass
class Route:
    body: bytes
    truncate_at: int | None = None  # close the connection after this many bytes, once per `truncations`
    truncations: int = 0
    stall: float = 0.0  # seconds to sleep after the headers
    ignore_range: bool = False
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
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
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
