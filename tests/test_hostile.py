"""Hostile and careless use: each case a user met with a wrong result, lost data, a leak or a traceback.
The cases that need a whole pipeline run are in tests/test_pipeline.py (lost mlflow.db, moved work dir)."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from flows.cli import main
from flows.config import build_config
from storage.images import find_images
from storage.redact import redact, redact_text

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- wrong results reported as success
@pytest.mark.parametrize(
    "setting", ["train.lr=Infinity", "train.lr=nan", "download.timeout=inf", "train.grad_clip=-Infinity"]
)
def test_non_finite_settings_are_refused(setting: str, tmp_path: Path, capsys) -> None:
    assert main(["run", "--set", setting, "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert setting.split("=")[0] in err and len(err.splitlines()) == 1


@pytest.mark.slow  # a training run
def test_a_diverging_loss_fails_training_and_caches_nothing(tmp_path: Path, monkeypatch) -> None:
    from tasks import download, prepare, train
    from tasks.train_step import DivergedError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = build_config("tiny", ["train.lr=1e30", "train.grad_clip=null", "train.max_steps=4"])
    dl = download.run(download.plan(cfg.download, cfg.seed, tmp_path)).manifest
    prep = prepare.run(prepare.plan(cfg.prepare, cfg.seed, dl, None, tmp_path)).manifest
    plan = train.plan(cfg.train, cfg.seed, "max", prep, tmp_path)
    with pytest.raises(DivergedError, match="training diverged at step"):
        train.run(plan)
    assert not (tmp_path / "train" / plan["key"]).exists()
    assert json.loads((tmp_path / "train" / "last.json").read_text())["state"] == "failed"


def test_a_nan_model_is_never_champion_and_its_psnr_is_not_infinite() -> None:
    from metrics_reference import image_metrics

    from model.metrics import BASELINE, COLUMNS
    from tasks.register import choose

    truth = np.full((16, 16, 3), 0.5)
    m = image_metrics(truth, np.full((16, 16, 3), np.nan), np.zeros((2, 8, 8)), np.full((2, 8, 8), np.nan))
    assert math.isnan(m["psnr"]) and math.isnan(m["rgb_mse"])

    def row(variant: str, **v: float) -> dict:
        return {"variant": variant, **dict.fromkeys(COLUMNS, 0.5), **v}

    table = [row(BASELINE, psnr=20.0), row("max", psnr=math.nan, ssim=math.nan), row("concat", psnr=19.0)]
    assert choose(table, "psnr", "ssim")["variant"] == "concat"
    assert choose(table, "rgb_mse", "ssim")["variant"] == "concat"  # a NaN tie-breaker loses the tie


def test_a_work_dir_inside_the_photo_folder_is_never_read_as_photos(tmp_path: Path) -> None:
    from tasks.download import folder_fingerprint

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(data.astronaut()[i * 50 : i * 50 + 100, :100]).save(photos / f"p{i}.png")
    work = photos / "work"
    before = folder_fingerprint(photos, work)
    (work / "train" / "abc").mkdir(parents=True)
    Image.new("RGB", (90, 90), (0, 200, 0)).save(work / "train" / "abc" / "samples.png")
    (work / "mlflow.db").write_bytes(b"")
    other = photos / "old-run"  # another work dir, not the current one
    (other / "evaluate" / "k").mkdir(parents=True)
    (other / "mlflow.db").write_bytes(b"")
    Image.new("RGB", (90, 90)).save(other / "evaluate" / "k" / "grid.png")
    assert [p.name for p in find_images(photos, work)] == ["p0.png", "p1.png", "p2.png"]
    assert folder_fingerprint(photos, work) == before  # the key does not change as the run writes


# ---------------------------------------------------------------- colorize image never loses a photo
def _img(path: Path, colour: tuple[int, int, int] = (120, 60, 30), size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_every_input_gets_its_own_output_with_the_folder_layout_kept(tmp_path: Path, model_dir: Path) -> None:
    src = tmp_path / "in"
    for rel in ("a.png", "sub/a.png", "a.gif", "b.jpg", "b.JPG"):
        _img(src / rel)
    assert main(["image", str(src), "--out", str(tmp_path / "out"), "--model", str(model_dir)]) == 0
    got = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["a.gif.png", "a.png", "b.JPG", "b.jpg", "sub/a.png"]


def test_an_input_is_never_overwritten(tmp_path: Path, model_dir: Path, capsys) -> None:
    photo = _img(tmp_path / "same.png")
    before = photo.read_bytes()
    assert main(["image", str(photo), "--out", str(photo), "--model", str(model_dir)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    folder = tmp_path / "album"
    _img(folder / "x.png")
    _img(folder / "y.jpg")
    assert main(["image", str(folder), "--out", str(folder), "--model", str(model_dir)]) == 2
    assert photo.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["x.png", "y.jpg"]


@pytest.mark.parametrize("out", ["result.xyz", "result.gif", "result"])
def test_an_output_format_that_cannot_be_written_is_refused(tmp_path: Path, model_dir: Path, out: str, capsys):
    photo = _img(tmp_path / "p.png")
    assert main(["image", str(photo), "--out", str(tmp_path / out), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err
    assert not (tmp_path / out).exists()


def test_upscale_handles_images_a_few_pixels_wide(tmp_path: Path, model_dir: Path) -> None:
    for side in (1, 4, 10):
        _img(tmp_path / "in" / f"s{side}.png", size=(side, side + 2))
    code = main(["image", str(tmp_path / "in"), "--upscale", "--out", str(tmp_path / "o"), "--model", str(model_dir)])
    assert code == 0
    assert Image.open(tmp_path / "o" / "s4.png").size == (16, 24)


def _png(width: int, height: int, rows: bytes, interlace: int = 0) -> bytes:
    """A hand-made RGB PNG: the header's size, and whatever filtered rows are given as its pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _adam7_rows(rgb: np.ndarray) -> bytes:
    """An image's pixel data in Adam7 interlaced order (filter 0 on every row)."""
    out = b""
    for x, y, dx, dy in (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ):
        sub = rgb[y::dy, x::dx]
        if sub.size:
            out += b"".join(b"\x00" + row.tobytes() for row in sub)
    return out


def test_an_image_whose_data_stops_early_is_an_error_for_that_file_only(tmp_path: Path, model_dir: Path, capsys):
    """A PNG that declares 8000x8000 and carries one row was colorized as 64 MP of black, with exit 0."""
    from storage.images import ImageError, load_photo

    src = tmp_path / "in"
    src.mkdir()
    (src / "short.png").write_bytes(_png(8000, 8000, b"\x00" + b"\x80" * 24000))
    Image.fromarray(data.chelsea()[:64, :64]).save(src / "good.png")
    with pytest.raises(ImageError, match="truncated image data"):
        load_photo(src / "short.png")
    rgb = data.chelsea()[:37, :53].copy()  # an interlaced PNG that is complete loads as it is
    (tmp_path / "interlaced.png").write_bytes(_png(53, 37, _adam7_rows(rgb), interlace=1))
    assert np.array_equal(load_photo(tmp_path / "interlaced.png").rgb, rgb)
    assert main(["image", str(src), "--out", str(tmp_path / "out"), "--model", str(model_dir)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "short.png" in err[0] and "truncated image data" in err[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


def test_an_output_folder_inside_the_input_folder_is_never_read_back(tmp_path: Path, model_dir: Path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(data.chelsea()[:64, :64]).save(photos / "a.png")
    argv = ["image", str(photos), "--out", str(photos / "out"), "--model", str(model_dir)]
    assert main(argv) == 0
    assert main(argv) == 0  # the rerun replaces its own result, instead of refusing or colorizing it again
    assert "(replaced the existing file)" in capsys.readouterr().out
    assert sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png")) == ["a.png", "out/a.png"]
    # an input given by hand that a result would overwrite: the message names that input, not another
    assert main(["image", str(photos / "a.png"), str(photos / "out" / "a.png"), "--out", str(photos / "out"),
                 "--model", str(model_dir)]) == 2  # fmt: skip
    err, later = capsys.readouterr().err, photos / "out" / "a.png"
    assert f"the result of {photos / 'a.png'} to {later} would overwrite the input {later}" in err


def test_a_network_size_that_cannot_fit_in_memory_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    for command in ("image", "video"):
        with pytest.raises(SystemExit) as done:
            main([command, str(tmp_path / "x.png"), "--size", "8192", "--out", str(tmp_path / "o.mp4")])
        assert done.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "up to 2048" in err[0]


# ---------------------------------------------------------------- user mistakes: one line, exit 2, no work
def test_max_pixels_above_pillows_own_limit_is_honoured(tmp_path: Path) -> None:
    from storage.images import load_photo

    big = tmp_path / "big.png"
    Image.new("L", (10_000, 9_000)).save(big)  # 90 MP: over Pillow's default 89.5 MP bomb limit
    assert load_photo(big, max_pixels=100_000_000).rgb.shape == (9_000, 10_000, 3)


def test_an_all_grayscale_folder_is_a_user_error(prefect_harness, tmp_path: Path, capsys) -> None:
    for i in range(3):
        Image.fromarray(data.camera()[i * 100 : i * 100 + 100, :100]).save(tmp_path / f"g{i}.png")
    argv = ["run", "--dataset", "folder", "--path", str(tmp_path), "--preset", "tiny", "--workdir", str(tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "usable colour photo" in err[0] and "rerun" not in err[0]


def test_a_hostile_archive_reads_as_the_users_problem(prefect_harness, tmp_path: Path, http_server, capsys) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    url = http_server.add("/c.tar.gz", buf.getvalue())
    md5 = __import__("hashlib").md5(buf.getvalue()).hexdigest()
    argv = ["run", "--dataset", "cifar10", "--preset", "tiny", "--until", "download", "--workdir", str(tmp_path)]
    assert main([*argv, "--set", f"download.cifar10_url={url}", "--set", f"download.cifar10_md5={md5}"]) == 1
    err = capsys.readouterr().err.strip().split("\r")[-1]  # after the progress bar's last redraw
    assert err.startswith("error: download failed: ") and "escapes the target folder" in err
    assert "Task run" not in err and "rerun" not in err and len(err.splitlines()) == 1


def test_only_a_network_failure_is_retried() -> None:
    """The download stage's Prefect retries (35 s of waiting) are for the network; a user's mistake or a
    full disk fails at once, with its one line."""
    import urllib.error

    from prefect.states import Failed

    from flows.pipeline import retry_helps
    from storage.archives import UnsafeArchiveError
    from storage.errors import ConfigError, DataError
    from storage.fetch import DownloadError

    def retried(exc: BaseException) -> bool:
        return retry_helps(None, None, Failed(data=exc))

    assert retried(DownloadError("connection reset")) and retried(urllib.error.URLError("timed out"))
    assert retried(ConnectionResetError()) and retried(TimeoutError())
    assert not retried(UnsafeArchiveError("escapes the target folder")) and not retried(DataError("no colour"))
    assert not retried(ConfigError("bad setting")) and not retried(ValueError("a bug"))
    assert not retried(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


# ---------------------------------------------------------------- disk full, and a broken status file
def test_a_full_disk_is_one_line_and_the_status_says_failed(prefect_harness, tmp_path: Path, monkeypatch, capsys):
    from storage import shards

    def full(self, sample):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.ShardWriter, "write", full)
    argv = ["run", "--preset", "tiny", "--until", "download", "--workdir", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0].lower() and "free some space" in err[0]
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    assert "download   failed" in capsys.readouterr().out
    assert not list(tmp_path.glob("download/*/manifest.json"))


@pytest.mark.parametrize("content", ["{not json", "[]", '{"state": 3}', '{"key": "abc"}', ""])
def test_status_survives_a_malformed_last_json(tmp_path: Path, content: str, capsys) -> None:
    (tmp_path / "train").mkdir(parents=True)
    (tmp_path / "train" / "last.json").write_text(content)
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    assert "train      unreadable" in capsys.readouterr().out


# ---------------------------------------------------------------- secrets and exposure
@pytest.mark.parametrize(
    ("value", "secret"),
    [
        ("https://:SECRET1@host/x.zip", "SECRET1"),
        ("https://bob:p@ss@host/x.zip", "ss@host"),
        ("https://bob:SECRET2@host/x.zip", "SECRET2"),
        ("https://host/x.zip?X-Amz-Signature=SECRET3&token=SECRET4&ok=1", "SECRET3"),
        ("https://host/x.zip?X-Amz-Signature=SECRET3&token=SECRET4&ok=1", "SECRET4"),
        ("https://host/x.zip?access_key=SECRET5", "SECRET5"),
        ("https://host/cb#access_token=SECRET6&state=ok", "SECRET6"),
        ("https://host/x.zip;jsessionid=SECRET7", "SECRET7"),
        ("could not download https://host/x?sig=SECRET8 after 2 tries", "SECRET8"),
        ("https://host/x?X-Amz-Credential=AKIA%2FSECRET9&X-Amz-Date=1", "SECRET9"),
        ("https://acct.blob.core.windows.net/c/x.zip?sv=2022&sr=b&sig=SECRET10%3D&se=2030", "SECRET10"),
        ("https://storage.googleapis.com/b/x?X-Goog-Signature=SECRET11", "SECRET11"),
        ("https://d111.cloudfront.net/x.zip?Expires=1&Signature=SECRET12&Key-Pair-Id=K", "SECRET12"),
        ("ftp://anon:SECRET13@host/pub/x.zip", "SECRET13"),
        ("https://host/x.zip?jwt=SECRET14", "SECRET14"),
    ],
)
def test_credentials_in_urls_are_redacted(value: str, secret: str) -> None:
    for clean in (redact("download.div2k_train_url", value), redact_text(value)):
        assert secret not in clean and "***" in clean and clean.count("/") >= value.count("/") - 1
    assert "ok=1" in redact("u", "https://host/x.zip?X-Amz-Signature=S&ok=1")
    assert redact("store.api_token", "anything") == "***"


def test_the_raw_overrides_never_reach_prefects_database(prefect_harness, tmp_path: Path) -> None:
    import asyncio

    from prefect.client.orchestration import get_client

    secret_url = "https://mirror.example/cifar.tar.gz?token=TOKSECRET#access_token=FRAGSECRET"
    argv = ["run", "--preset", "tiny", "--until", "download", "--workdir", str(tmp_path)]
    assert main([*argv, "--set", f"download.cifar10_url={secret_url}"]) == 0

    async def parameters() -> list[dict]:
        async with get_client() as client:
            return [r.parameters for r in await client.read_flow_runs()]

    stored = json.dumps(asyncio.run(parameters()))
    assert "mirror.example" in stored and "TOKSECRET" not in stored and "FRAGSECRET" not in stored


SECRETS = ("T0KENv4lue", "S1Gv4lue", "FR4Gv4lue")


def test_a_signed_download_url_works_and_its_secrets_are_stored_and_shown_nowhere(tmp_path: Path, http_server):
    """A whole `colorize run` in its own process (its Prefect server and database, its MLflow store, all in
    the work dir): once downloading through a signed URL, once failing on one. Every file left in the
    work dir, and everything printed, is searched for the secrets."""
    import hashlib

    from test_download import _cifar_archive

    body = _cifar_archive()
    url = http_server.add("/c.tar.gz", body)
    query = f"?token={SECRETS[0]}&sig={SECRETS[1]}#access_token={SECRETS[2]}"
    workdir = tmp_path / "w"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}

    def run(target: str) -> subprocess.CompletedProcess:
        argv = ["run", "--dataset", "cifar10", "--preset", "tiny", "--until", "download", "--workdir", str(workdir)]
        sets = [f"download.cifar10_url={target}", f"download.cifar10_md5={hashlib.md5(body).hexdigest()}"]
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            *argv,
            *(a for s in sets for a in ("--set", s)),
            "--set",
            "download.retries=0",
        ]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    ok = run(url + query)
    assert ok.returncode == 0, ok.stderr[-2000:]
    failed = run(url.replace("/c.tar.gz", "/gone.tar.gz") + query)  # a 404: the error paths
    assert failed.returncode == 1 and "could not download" in failed.stderr and "token=***" in failed.stderr
    printed = ok.stdout + ok.stderr + failed.stdout + failed.stderr
    assert not [s for s in SECRETS if s in printed]
    from storage.tracking import Tracker, flatten

    tracker = Tracker(workdir)  # what the pipeline logs to MLflow for a run with these settings
    run_id = tracker.start_run("secrets", tags={"source": url + query})
    tracker.log_params(run_id, flatten("download", {"cifar10_url": url + query}))
    tracker.end_run(run_id)
    assert (workdir / ".prefect").is_dir() and (workdir / "mlflow.db").is_file()  # both stores are searched
    leaks = [
        (str(f.relative_to(workdir)), s)
        for f in workdir.rglob("*")
        if f.is_file()
        for s in SECRETS
        if s.encode() in f.read_bytes()
    ]
    assert leaks == []
    manifest = json.loads(next((workdir / "download").glob("*/manifest.json")).read_text())
    assert "token=***" in manifest["config"]["cifar10_url"] and "[sha256:" in manifest["config"]["cifar10_url"]


def test_a_url_with_credentials_is_refused_before_any_work_with_the_supported_way(tmp_path: Path, capsys) -> None:
    url = "https://alice:PASSW0RD@127.0.0.1:9/c.tar.gz"
    argv = ["run", "--dataset", "cifar10", "--until", "download", "--workdir", str(tmp_path / "w")]
    assert main([*argv, "--set", f"download.cifar10_url={url}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "netrc" in err[0] and "PASSW0RD" not in err[0], err
    assert not (tmp_path / "w" / "download").exists()


def test_netrc_credentials_are_sent_as_basic_auth(tmp_path: Path, http_server, monkeypatch) -> None:
    import base64

    from storage.fetch import DownloadError, download

    url = http_server.add("/private.bin", b"x" * 1000, auth="Basic " + base64.b64encode(b"alice:s3cret").decode())
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(DownloadError, match="Unauthorized"):
        download(url, tmp_path / "a.bin", retries=0, progress=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert download(url, tmp_path / "b.bin", retries=0, progress=False).read_bytes() == b"x" * 1000


def test_binding_beyond_loopback_warns_that_there_is_no_authentication() -> None:
    from flows.ui import exposure_warning

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host) is None
    for host in ("0.0.0.0", "192.0.2.10", "::"):
        text = exposure_warning(host)
        assert text and "no authentication" in text and host in text


# ---------------------------------------------------------------- the temporary Prefect server never leaks
def _servers_of(workdir: Path) -> list[int]:
    from flows.env import prefect_servers

    return prefect_servers(workdir)


def _start_run(workdir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    argv = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--workdir", str(workdir)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not _servers_of(workdir):
        assert proc.poll() is None, "the run ended before its Prefect server started"
        time.sleep(0.5)
    assert _servers_of(workdir), "no temporary Prefect server was seen"
    return proc


@pytest.mark.slow  # a whole `colorize run` process per signal
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
def test_a_stopping_signal_stops_the_temporary_prefect_server(tmp_path: Path, sig: signal.Signals) -> None:
    """A supervisor's SIGTERM, a closed terminal's SIGHUP, Ctrl-C: `colorize run` ends and its server too."""
    proc = _start_run(tmp_path)
    time.sleep(2)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) != 0
    deadline = time.time() + 30
    while _servers_of(tmp_path) and time.time() < deadline:
        time.sleep(0.5)
    assert _servers_of(tmp_path) == []


@pytest.mark.slow  # a whole `colorize run` process
def test_an_orphaned_server_of_this_work_dir_is_stopped_by_the_next_run(tmp_path: Path) -> None:
    from flows.env import stop_orphaned_servers

    proc = _start_run(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    orphans = _servers_of(tmp_path)
    assert orphans, "SIGKILL left no orphan to clean up"
    assert stop_orphaned_servers(tmp_path) == orphans
    assert _servers_of(tmp_path) == []
