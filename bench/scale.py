"""Benchmark: what a shard costs on Dask beyond its compute, and the scaling model that implies.

Measured in one run, on this machine:
- **compute**: the upscale stage's own shard job (``tasks.upscale.upscale_shard``, default engine) on a
  real shard of ``--images`` 32x32 photo crops, as seconds per image; times the default shard size
  (``download.shard_maxcount``, 1000) gives a default shard's compute;
- **startup**: ``runner.kind=dask`` mapping one no-op job (a LocalCluster of ``--workers`` processes,
  the client, one Prefect task run against the Prefect server);
- **overhead**: the extra wall time per shard when ``--tasks`` no-op jobs go through the same path,
  times the worker count (what one worker spends per shard outside the shard's work).

Then: overhead as a share of a default shard's compute (target: under 5%), and the model
``time = startup + shards x (overhead + compute) / workers`` for CIFAR-10's 60 shards at a few worker
counts. A Prefect server is started on 127.0.0.1 for the run unless ``PREFECT_API_URL`` is set. On a
2-core machine more workers cannot run faster (each engine already uses the cores); the model is for N
machines. Last line: ``RATIO overhead_share <value>``.

    .venv/bin/python bench/scale.py [--images 16] [--tasks 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SHARD = 1000  # download.shard_maxcount's default
CIFAR_SHARDS = 60


def noop(job: int) -> int:
    return job


def _server(tmp: Path) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home")}
    env.pop("PREFECT_API_URL")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(240):
        try:
            urllib.request.urlopen(os.environ["PREFECT_API_URL"] + "/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the Prefect server did not start")


def shard_compute(tmp: Path, images: int) -> tuple[float, str]:
    """Seconds per image of the stage's own shard job on a real shard, and the engine used."""
    sys.path.insert(0, str(Path(__file__).parent))
    from upscale import crops

    from storage.shards import ShardWriter, encode_png
    from tasks import upscale

    with ShardWriter(tmp, "lowres-train", maxcount=10**9) as writer:
        for i, img in enumerate(crops(images)):
            writer.write({"__key__": f"c{i:05d}", "png": encode_png(img), "json": b"{}"})
    cfg = upscale.Settings()
    plan = upscale.plan(
        cfg, {"stage": "download", "sets": {"lowres": {"train": images}}, "key": "k", "content": "c"}, tmp
    )
    job = upscale.UpscaleJob(plan, str(tmp / "out"), "train", str(tmp / "lowres-train-000000.tar"))
    (tmp / "out").mkdir()
    (tmp / "warm").mkdir()
    upscale.upscale_shard(upscale.UpscaleJob(plan, str(tmp / "warm"), "train", job.shard))  # engine load, first call
    t0 = time.perf_counter()
    upscale.upscale_shard(job)
    return (time.perf_counter() - t0) / images, plan["facts"]["backend"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from storage.shard_runner import map_shards

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = None if os.environ.get("PREFECT_API_URL") else _server(tmp)
        try:
            per_image, engine = shard_compute(tmp, args.images)
            runner = {"kind": "dask", "workers": args.workers}
            t0 = time.perf_counter()
            map_shards(runner, noop, [0], ["noop 0"])
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()
            map_shards(runner, noop, list(range(args.tasks)), [f"noop {i}" for i in range(args.tasks)])
            many = time.perf_counter() - t0
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    overhead = max(0.0, many - startup) * args.workers / max(1, args.tasks - 1)
    compute = per_image * SHARD
    share = overhead / compute
    print(f"compute: {per_image:.3f} s/image ({engine}), {compute:.0f} s for a {SHARD}-image shard")
    print(f"startup: {startup:.1f} s (LocalCluster of {args.workers}, client, one Prefect task)")
    print(f"overhead: {overhead:.2f} s per shard per worker ({args.tasks} no-op Prefect tasks in {many:.1f} s)")
    print(f"overhead / compute at the default shard size: {100 * share:.3f}% (target < 5%)")
    serial = CIFAR_SHARDS * compute
    for n in (1, 2, 8, 32):
        model = startup + CIFAR_SHARDS * (overhead + compute) / n
        print(f"  CIFAR-10, {CIFAR_SHARDS} shards, {n:>2} worker(s): {model / 3600:5.2f} h ({serial / model:5.2f}x)")
    print(f"RATIO overhead_share {share:.5f}")


if __name__ == "__main__":
    main()
