"""The stage store on a real S3 server (``rclone serve s3`` on 127.0.0.1): finished stages published and
pulled back into a fresh work dir instead of recomputed; a killed upload, a tampered object and a
hostile manifest never count as a finished stage; bad credentials are one line, before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.pipeline import pipeline
from storage.errors import ConfigError, DataError, TransientError
from storage.stage import MANIFEST, digest, install, make_plan, run_stage
from storage.stage_store import StageStore, _quiet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.env()


def _finished_stage(workdir: Path, files: dict[str, bytes]) -> dict:
    plan = make_plan(workdir, "demo", {}, {"n": len(files)}, "code-v1")

    def work(out: Path) -> dict:
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        return {}

    run_stage(plan, work)
    return plan


def _objects(s3_server, prefix: str) -> dict[str, Path]:
    base = s3_server.root / s3_server.bucket / prefix
    return {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()}


def test_a_fresh_work_dir_pulls_the_published_stages_instead_of_recomputing(
    s3_server, s3_env, prefect_harness, tmp_path: Path
) -> None:
    url = f"s3://{s3_server.bucket}/pulled"
    args = {"dataset": "sample", "preset": "tiny", "until": "prepare", "overrides": [f"store.url={url}"]}
    first = pipeline(workdir=str(tmp_path / "a"), **args)
    assert {c["stage"]: c["state"] for c in first["calls"]} == {"download": "ran", "upscale": "ran", "prepare": "ran"}
    objects = _objects(s3_server, "pulled")
    for stage in ("download", "upscale", "prepare"):
        manifest = json.loads((Path(first["stages"][stage]) / MANIFEST).read_text())
        assert (
            objects[f"{stage}/{manifest['key']}/{MANIFEST}"].read_bytes()
            == (Path(first["stages"][stage]) / MANIFEST).read_bytes()
        )
        assert all(f"{stage}/{manifest['key']}/{rel}" in objects for rel in manifest["files"])

    second = pipeline(workdir=str(tmp_path / "b"), **args)
    assert {c["stage"]: c["state"] for c in second["calls"]} == {
        "download": "pulled",
        "upscale": "pulled",
        "prepare": "pulled",
    }
    for stage in ("download", "upscale", "prepare"):
        a, b = Path(first["stages"][stage]), Path(second["stages"][stage])
        assert a.name == b.name and a != b
        assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*"))
        assert all(p.read_bytes() == (b / p.relative_to(a)).read_bytes() for p in a.rglob("*") if p.is_file())


def test_a_killed_upload_leaves_no_finished_stage(s3_server, s3_env, tmp_path: Path) -> None:
    """The uploader is SIGKILLed once its first object has landed (others of the concurrent batch may
    have too): objects without a manifest are not a stage."""
    plan = _finished_stage(tmp_path, {f"shard-{i}.bin": os.urandom(1000 + i) for i in range(5)})
    url = f"s3://{s3_server.bucket}/killed"
    script = (
        "import sys, time\n"
        "from storage.stage_store import StageStore\n"
        "def stall(done, total):\n"
        "    print('uploaded', done, 'of', total, flush=True)\n"
        "    time.sleep(600)\n"
        f"StageStore({url!r}).publish({str(tmp_path / 'demo' / plan['key'])!r}, progress=stall)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("uploaded"), "the upload never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    objects = _objects(s3_server, "killed")
    assert 1 <= len(objects) <= 5 and MANIFEST not in {Path(k).name for k in objects}
    store = StageStore(url)
    assert store.manifest("demo", plan["key"])[0] is None
    assert store.pull({**plan, "workdir": str(tmp_path / "elsewhere")}) is None
    assert not (tmp_path / "elsewhere" / "demo" / plan["key"]).exists()

    assert store.publish(tmp_path / "demo" / plan["key"])  # a rerun completes it
    assert store.manifest("demo", plan["key"])[0] is not None
    assert not store.publish(tmp_path / "demo" / plan["key"])  # and then has nothing left to do


def test_a_tampered_object_fails_verification_and_is_not_served_again(s3_server, s3_env, tmp_path: Path) -> None:
    plan = _finished_stage(tmp_path, {"a.bin": b"A" * 4096, "sub/b.bin": b"B" * 100})
    store = StageStore(f"s3://{s3_server.bucket}/tampered")
    store.publish(tmp_path / "demo" / plan["key"])
    victim = _objects(s3_server, "tampered")[f"demo/{plan['key']}/a.bin"]
    victim.write_bytes(b"X" + victim.read_bytes()[1:])  # same size: only the content check can tell
    elsewhere = {**plan, "workdir": str(tmp_path / "elsewhere")}
    assert store.manifest("demo", plan["key"])[0] is not None  # sizes hold
    assert store.pull(elsewhere) is None
    assert not (tmp_path / "elsewhere" / "demo" / plan["key"]).exists()  # nothing unverified in the work dir
    assert not list((tmp_path / "elsewhere" / "demo").glob(".*"))  # nor left behind half-made
    assert store.manifest("demo", plan["key"])[0] is None  # un-finished in the store, for every reader
    assert store.publish(tmp_path / "demo" / plan["key"])  # republished whole from a good copy
    assert store.pull(elsewhere) is not None
    assert (tmp_path / "elsewhere" / "demo" / plan["key"] / "a.bin").read_bytes() == b"A" * 4096


def test_a_manifest_naming_files_outside_its_folder_is_refused(tmp_path: Path) -> None:
    """A manifest from a store is input: ``../`` in a file name must not write outside the stage folder,
    even when the manifest checks itself (anyone can recompute the checksum)."""
    plan = _finished_stage(tmp_path / "src", {"a.bin": b"data"})
    manifest = json.loads((tmp_path / "src" / "demo" / plan["key"] / MANIFEST).read_text())
    fetched = []
    for name in ("../../escaped.bin", "/etc/escaped.bin", "scratch/state.pt"):
        hostile = {**manifest, "files": {name: manifest["files"]["a.bin"]}}
        hostile["manifest_sha256"] = digest({k: v for k, v in hostile.items() if k != "manifest_sha256"})
        got, why = install({**plan, "workdir": str(tmp_path / "w")}, hostile, lambda pairs: fetched.extend(pairs))
        assert got is None and "outside the stage folder" in why, name
    assert not fetched and not list(tmp_path.rglob("escaped.bin"))
    clashing = {**manifest, "files": {"a": manifest["files"]["a.bin"], "a/b": manifest["files"]["a.bin"]}}
    clashing["manifest_sha256"] = digest({k: v for k, v in clashing.items() if k != "manifest_sha256"})
    got, why = install({**plan, "workdir": str(tmp_path / "w")}, clashing, lambda pairs: fetched.extend(pairs))
    assert got is None and "'a' is both a file and a folder" in why and not fetched


def test_the_stage_process_fetches_worker_outputs_only_by_names_inside_its_folder(tmp_path: Path) -> None:
    from storage import locations

    (tmp_path / "exchange").mkdir()
    (tmp_path / "exchange" / "part.tar").write_bytes(b"part")
    for name in ("../escaped.tar", "/etc/escaped.tar"):
        with pytest.raises(ValueError, match="leaves"):
            locations.download(f"file://{tmp_path / 'exchange'}", [name], tmp_path / "out")
    locations.download(f"file://{tmp_path / 'exchange'}", ["part.tar"], tmp_path / "out")
    assert (tmp_path / "out" / "part.tar").read_bytes() == b"part"
    with pytest.raises(TransientError, match="is missing"):  # a lost output fails the stage, never thins it
        locations.download(f"file://{tmp_path / 'exchange'}", ["lost.tar"], tmp_path / "out")


def test_a_worker_reads_and_writes_only_through_the_store_and_checks_what_it_reads(
    s3_server, s3_env, tmp_path: Path, monkeypatch
) -> None:
    """The shard job a Dask worker runs with a stage store: its input is the store's copy of the shard
    (checked against the manifest's sha256), its output one object in the stage's exchange prefix, equal
    to the local job's output; a changed input object is refused before anything is computed."""
    from flows.config import build_config
    from storage.shard_runner import source
    from tasks import download
    from tasks import upscale as up

    cfg = build_config("tiny", ["upscale.method=bicubic", "download.shard_maxcount=4"])
    dl = download.run(download.plan(cfg.download, cfg.seed, tmp_path / "head")).manifest
    store = f"s3://{s3_server.bucket}/worker"
    StageStore(store).publish(dl["folder"])
    plan = up.plan(cfg.upscale, dl, tmp_path / "head")
    shard = Path(dl["folder"]) / "lowres-train-000000.tar"
    exchange = f"{store}/upscale/{plan['key']}.partial"

    monkeypatch.chdir(tmp_path)
    remote = up.upscale_shard(up.UpscaleJob(plan, exchange, "train", **source(dl, shard, store)))
    local = up.upscale_shard(up.UpscaleJob(plan, str(tmp_path / "local"), "train", **source(dl, shard, None)))
    assert remote == {**local, "seconds": remote["seconds"]} and remote["n"] == 4
    objects = _objects(s3_server, f"worker/upscale/{plan['key']}.partial")
    assert list(objects) == [remote["file"]]
    assert objects[remote["file"]].read_bytes() == (tmp_path / "local" / local["file"]).read_bytes()
    assert up.upscale_shard(up.UpscaleJob(plan, exchange, "train", **source(dl, shard, store)))["processed"] == 0

    victim = _objects(s3_server, f"worker/download/{dl['key']}")[shard.name]
    data = bytearray(victim.read_bytes())
    data[-2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match the sha256"):
        up.upscale_shard(up.UpscaleJob(plan, f"{store}/other.partial", "train", **source(dl, shard, store)))
    assert not _objects(s3_server, "worker/other.partial")


def test_credentials_are_never_echoed(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t/EXAMPLE+key")
    said = _quiet("InvalidAccessKeyId: AKIAEXAMPLEKEY123 (signed with s3cr3t/EXAMPLE+key)")
    assert "AKIAEXAMPLEKEY123" not in said and "s3cr3t" not in said and said.count("***") == 2
    with pytest.raises(ConfigError, match="must not hold credentials") as err:
        StageStore("s3://user:s3cr3t@bucket/prefix")
    assert "s3cr3t" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "secret", "message"),
    [
        ("s3://colorize/x", "wrong-secret-0123456789", "refused the credentials"),
        ("s3://no-such-bucket/x", None, "the bucket 'no-such-bucket' does not exist"),
    ],
)
def test_a_store_it_cannot_use_is_refused_in_one_line_before_any_work(
    s3_server, tmp_path: Path, url: str, secret: str | None, message: str
) -> None:
    env = {**os.environ, **s3_server.env(secret), "PREFECT_HOME": str(tmp_path / "prefect")}
    cmd = [str(Path(sys.executable).parent / "colorize"), "run", "--preset", "tiny", "--workdir", str(tmp_path / "w")]
    start = time.monotonic()
    proc = subprocess.run([*cmd, "--set", f"store.url={url}"], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert message in out and "Traceback" not in out and len(proc.stderr.strip().splitlines()) == 1, out
    assert s3_server.secret not in out and "wrong-secret" not in out and s3_server.key not in out
    assert not (tmp_path / "w" / "download").exists(), time.monotonic() - start  # refused before any work


def test_store_options_reach_the_store_and_the_processes_it_starts(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``store.options`` alone points s3fs at the server (no AWS_ENDPOINT_URL_S3): a stage published in
    one batch and pulled back whole, and a child process (as a Dask worker) opening s3:// sees them too."""
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {})
    monkeypatch.setenv("FSSPEC_S3", "{}")  # restored (unset) after the test, whatever configure() writes
    env = s3_server.env()
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    files = {f"part-{i:02d}.bin": os.urandom(2000 + i) for i in range(12)} | {"sub/x.json": b"{}"}
    plan = _finished_stage(tmp_path, files)
    options = {"endpoint_url": s3_server.endpoint, "config_kwargs": {"max_pool_connections": 8}}
    store = StageStore.of({"url": f"s3://{s3_server.bucket}/options", "options": options})
    seen: list[tuple[int, int]] = []
    assert store.publish(tmp_path / "demo" / plan["key"], progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(files), len(files)) and len(seen) == len(files)
    assert set(_objects(s3_server, f"options/demo/{plan['key']}")) == {*files, MANIFEST}
    pulled = store.pull({**plan, "workdir": str(tmp_path / "elsewhere")})
    assert pulled is not None
    assert all((Path(pulled["folder"]) / rel).read_bytes() == data for rel, data in files.items())

    code = f"import fsspec; print(len(fsspec.filesystem('s3').find('{s3_server.bucket}/options/demo')))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout) == len(files) + 1


def test_store_options_holding_credentials_are_refused_without_echoing_them() -> None:
    from flows.config import build_config

    for options in (
        '{"key": "AKIAEXAMPLE"}',
        '{"client_kwargs": {"aws_secret_access_key": "s3cr3t"}}',
        '{"endpoint_url": "https://AKIAEXAMPLE:s3cr3t@minio.example:9000"}',
        '{"client_kwargs": {"headers": [{"Authorization": "Bearer s3cr3t"}]}}',
        '{"s3_additional_kwargs": {"SSEKMSKeyId": "arn:aws:kms:s3cr3t"}}',
    ):
        with pytest.raises(ConfigError, match="store.options: must not hold credentials") as err:
            build_config("tiny", ["store.url=s3://b/p", f"store.options={options}"])
        assert "AKIAEXAMPLE" not in str(err.value) and "s3cr3t" not in str(err.value)
    fine = {"client_kwargs": {"region_name": "eu-1"}, "s3_additional_kwargs": {"ACL": "private"}}
    cfg = build_config("tiny", ["store.url=s3://b/p", f"store.options={json.dumps(fine)}"])
    assert cfg.store.options == fine


def test_one_run_validates_its_settings_once_and_probes_the_store_once(
    s3_server, s3_env, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`colorize run` checks before Prefect starts and the flow would check again (a deployment has only
    the flow): in one process the settings are validated once and the store's write probe runs once."""
    from flows import config
    from flows import pipeline as flow_module
    from flows.cli import main

    calls = {"validate": 0, "probe": 0}
    real_build, real_check = config.build_config, StageStore.check

    def counted_build(*args, **kw):
        calls["validate"] += 1
        return real_build(*args, **kw)

    def counted_check(self):
        calls["probe"] += 1
        return real_check(self)

    monkeypatch.setattr(flow_module.pipeline_config, "build_config", counted_build)
    monkeypatch.setattr(StageStore, "check", counted_check)
    url = f"s3://{s3_server.bucket}/once-{tmp_path.name}"
    argv = [
        "run",
        "--preset",
        "tiny",
        "--until",
        "download",
        "--workdir",
        str(tmp_path / "w"),
        "--set",
        f"store.url={url}",
    ]
    assert main(argv) == 0
    assert calls == {"validate": 1, "probe": 1}
