"""The loopback cluster proof: the tiny pipeline on a Prefect server, a Dask scheduler and two worker
processes, an S3 server holding the stage store and an MLflow server, all on 127.0.0.1, started here and
stopped after. It must end with a champion, its per-shard stages must equal the local runner's, every
shard must be a task run of the flow on the one server, and a worker killed mid-stage must be survived."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["--preset", "tiny", "--set", "download.shard_maxcount=4"]


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
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below, after the server stops
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(tmp, None),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"{api}/health", server, "prefect server", log=tmp / "server.log")
        yield api
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _colorize(
    tmp: Path, workdir: Path, api: str | None, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    """Start a run; its output goes to a file (a pipe nobody reads while the test polls would fill and
    stall the run)."""
    log = tmp / f"{workdir.name}.log"
    cmd = [str(BIN / "colorize"), "run", *TINY, "--workdir", str(workdir), *args]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env={**_env(tmp, api), **(env or {})}, stdout=fh, stderr=subprocess.STDOUT), log


def _wait(run: tuple[subprocess.Popen, Path], timeout: float) -> tuple[int, str]:
    """Wait for a run (killed past ``timeout``): its exit code and output."""
    proc, log = run
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, log.read_text(errors="replace")


def _stage(workdir: Path, stage: str) -> dict:
    key = json.loads((workdir / stage / "last.json").read_text())["key"]
    return json.loads((workdir / stage / key / "manifest.json").read_text())


def _task_runs(api: str, prefix: str) -> list[dict]:
    body = json.dumps({"task_runs": {"name": {"like_": prefix}}, "limit": 200}).encode()
    req = urllib.request.Request(f"{api}/task_runs/filter", body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def test_dask_runner_without_a_prefect_server_is_refused_in_one_line(tmp_path: Path) -> None:
    rc, out = _wait(_colorize(tmp_path, tmp_path / "w", None, "--set", "runner.kind=dask"), 120)
    assert rc == 2, out
    assert "runner.kind=dask needs a Prefect server" in out and "Traceback" not in out


@pytest.fixture
def dask_cluster(prefect_server: str, s3_server, tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker`` processes (one process, one thread each), as on worker
    machines: their own working folder and weights cache, given no path to the work dir, the Prefect
    API and the S3 credentials in their environment. Their logs: ``tmp_path/dask-*.log``."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**_env(tmp_path, prefect_server), **s3_server.env()}
    procs = []
    try:
        cmd = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]]
        procs.append(_logged([*cmd, "--no-dashboard"], env, tmp_path / "dask-scheduler.log", tmp_path))
        for i in range(2):
            home = tmp_path / f"worker-{i}"
            home.mkdir()
            cmd = [str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"]
            own = {**env, "TORCH_HOME": str(home / "torch")}
            procs.append(_logged([*cmd, "--host", "127.0.0.1"], own, tmp_path / f"dask-worker-{i}.log", home))
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _logged(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)


def test_the_pipeline_on_a_loopback_cluster_survives_a_killed_worker_and_matches_the_local_run(
    prefect_server: str, s3_server, mlflow_server, dask_cluster, tmp_path: Path
) -> None:
    """The tiny pipeline to a champion on a Prefect server, a Dask scheduler with two workers, an S3
    bucket as the stage store and an MLflow server, all on 127.0.0.1. Upscale and prepare run one Prefect
    task per shard on the workers, which read their input shards from the bucket and write their outputs
    to it; a worker running a shard is SIGKILLed mid-upscale (its nanny restarts it, the scheduler reruns
    its shard).
    The upscale and prepare folders are byte for byte the local runner's; every stage is in the bucket."""
    address = dask_cluster
    uri, _ = mlflow_server
    store = f"s3://{s3_server.bucket}/cluster"
    workdir = tmp_path / "dask"
    settings = ["runner.kind=dask", f"runner.address={address}", f"store.url={store}", "train.variants=max"]
    env = {**s3_server.env(), "COLORIZE_MLFLOW_URI": uri}
    run = _colorize(tmp_path, workdir, prefect_server, *_sets(settings), env=env)
    exchange = s3_server.root / s3_server.bucket / "cluster" / "upscale"
    victim = _busy_worker(run[0], exchange, address)
    if victim is None:
        pytest.fail("the upscale stage never ran on a worker:\n" + _wait(run, 10)[1][-3000:])
    os.kill(victim, signal.SIGKILL)
    rc, out = _wait(run, 900)
    assert rc == 0, out[-3000:]
    nannies = "".join((tmp_path / f"dask-worker-{i}.log").read_text(errors="replace") for i in range(2))
    assert "Restarting worker" in nannies, nannies[-3000:]  # the worker died mid-stage and came back

    # The same stages with the local runner, and on a LocalCluster sharing the work dir (no store)
    for name, more in (("local", []), ("localcluster", ["--set", "runner.kind=dask"])):
        rc, out = _wait(_colorize(tmp_path, tmp_path / name, prefect_server, "--until", "prepare", *more), 600)
        assert rc == 0, out[-3000:]
        for stage in ("upscale", "prepare"):
            a, b = _stage(tmp_path / name, stage), _stage(workdir, stage)
            assert a["key"] == b["key"] and a["files"] == b["files"] and a["content"] == b["content"], (name, stage)
    bucket = s3_server.root / s3_server.bucket / "cluster"
    for stage in ("download", "upscale", "prepare", "train", "evaluate", "register"):
        key = json.loads((workdir / stage / "last.json").read_text())["key"]
        published = (bucket / stage / key / "manifest.json").read_bytes()
        assert published == (workdir / stage / key / "manifest.json").read_bytes(), stage
    assert not list(bucket.glob("*/*.partial")), "the shard exchange prefixes were not cleaned up"

    register = _stage(workdir, "register")
    from mlflow import MlflowClient

    champion = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("colorizer", "champion")
    assert int(champion.version) == register["version"] and champion.tags["variant"] == "max"

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


def _sets(settings: list[str]) -> list[str]:
    return [arg for item in settings for arg in ("--set", item)]


def _busy_worker(proc: subprocess.Popen, exchange: Path, address: str) -> int | None:
    """The pid of a Dask worker running a shard, once the upscale stage is under way (its first output
    shard is in the bucket, so the others are queued or running): asked of the scheduler."""
    from distributed import Client

    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any(exchange.glob("*.partial/upscaled-*.tar")):
            break
        time.sleep(0.05)
    else:
        return None
    with Client(address, timeout=30) as client:
        for _ in range(200):
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy:
                return client.run(os.getpid, workers=busy[:1])[busy[0]]
            time.sleep(0.05)
    return None
