"""Per-shard upscale jobs on a Dask cluster: a Prefect server, a LocalCluster of two worker processes,
all on 127.0.0.1, started here and stopped after. The stage folder must equal the local runner's, every
shard must be a task run of the flow on the one server, and a worker killed mid-stage must be survived."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.atomic import is_temp

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["--preset", "tiny", "--until", "prepare", "--set", "download.shard_maxcount=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, api: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env["TORCH_HOME"] = os.environ.get("TORCH_HOME", str(tmp / "torch"))
    if api:
        env["PREFECT_API_URL"] = api
    return env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below, after the server stops
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(tmp, None),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError((tmp / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield api
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _colorize(tmp: Path, workdir: Path, api: str | None, *args: str, **kw) -> subprocess.Popen:
    cmd = [str(BIN / "colorize"), "run", *TINY, "--workdir", str(workdir), *args]
    return subprocess.Popen(cmd, env=_env(tmp, api), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _stage(workdir: Path, stage: str) -> dict:
    key = json.loads((workdir / stage / "last.json").read_text())["key"]
    return json.loads((workdir / stage / key / "manifest.json").read_text())


def _task_runs(api: str, prefix: str) -> list[dict]:
    body = json.dumps({"task_runs": {"name": {"like_": prefix}}, "limit": 200}).encode()
    req = urllib.request.Request(f"{api}/task_runs/filter", body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def test_dask_runner_without_a_prefect_server_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = _colorize(tmp_path, tmp_path / "w", None, "--set", "runner.kind=dask")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "runner.kind=dask needs a Prefect server" in out and "Traceback" not in out


def test_dask_shards_survive_a_killed_worker_and_match_the_local_run(prefect_server: str, tmp_path: Path) -> None:
    """One Prefect task per shard (upscale and prepare) on two Dask worker processes; one worker is
    SIGKILLed while it writes an upscaled shard: the nanny restarts it, the scheduler reruns that shard,
    and both stage folders are byte for byte the local runner's."""
    workdir = tmp_path / "dask"
    proc = _colorize(tmp_path, workdir, prefect_server, "--set", "runner.kind=dask")
    victim = None
    deadline = time.time() + 300
    while victim is None and proc.poll() is None and time.time() < deadline:
        for partial in workdir.glob("upscale/*.partial"):
            if any(is_temp(p) for p in partial.iterdir()):  # a shard being written
                victim = _worker_pid(partial)
        time.sleep(0.05)
    assert victim is not None, "no shard was seen in progress"
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

    local = _colorize(tmp_path, tmp_path / "local", prefect_server)
    out, _ = local.communicate(timeout=600)
    assert local.returncode == 0, out[-3000:]
    for stage in ("upscale", "prepare"):
        a, b = _stage(tmp_path / "local", stage), _stage(workdir, stage)
        assert a["key"] == b["key"] and a["files"] == b["files"] and a["content"] == b["content"], stage
    inputs = [f for f in _stage(workdir, "download")["files"] if f.endswith(".tar")]
    lowres = [f for f in inputs if f.startswith("lowres-")]
    assert len(lowres) >= 4
    deadline = time.time() + 60  # the server records task states from the workers' events asynchronously
    while True:
        completed = sorted(r["name"] for r in _task_runs(prefect_server, "% shard %") if r["state_type"] == "COMPLETED")
        upscaled = {n for n in completed if n.startswith("upscale ")}
        prepared = {n for n in completed if n.startswith("prepare ")}
        if (len(upscaled), len(prepared)) == (len(lowres), len(inputs)) or time.time() > deadline:
            break
        time.sleep(1)
    assert len(upscaled) == len(lowres), completed  # one task run per upscaled shard
    assert len(prepared) == len(inputs), completed  # one part per input shard (upscaled and high-res)


def _worker_pid(partial: Path) -> int | None:
    """The Dask worker process holding a file open under ``partial``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if "distributed" not in (proc / "cmdline").read_text() and "spawn" not in (proc / "cmdline").read_text():
                continue
            for fd in (proc / "fd").iterdir():
                if str(os.readlink(fd)).startswith(str(partial)):
                    return int(proc.name)
        except OSError:
            continue
    return None
