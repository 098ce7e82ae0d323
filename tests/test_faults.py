"""Faults, hostile input and security defaults (the fast cases; scripts/crash_resume.py and
scripts/concurrent_runs.sh cover SIGKILL in every stage and two whole runs at once)."""

from __future__ import annotations

import ast
import io
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from flows.config import build_config
from model.colorizer import load_folder as load_model
from storage import tracking
from storage.archives import UnsafeArchiveError, extract
from tasks import download, prepare
from tasks import train as train_stage

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("flows", "tasks", "model", "storage", "bench", "scripts") for p in (ROOT / d).rglob("*.py")]


# ---------------------------------------------------------------- security defaults
def test_every_torch_load_uses_weights_only_true() -> None:
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert len(calls) >= 4
    assert [c for c, ok in calls if not ok] == []


def test_servers_bind_to_loopback_by_default(tmp_path: Path, monkeypatch) -> None:
    from flows import env, ui
    from flows.cli import build_parser

    cmds = ui.commands(tmp_path, build_parser().parse_args(["ui"]).host, 5000, 4200)
    assert cmds["mlflow"][cmds["mlflow"].index("--host") + 1] == "127.0.0.1"
    assert cmds["prefect"][cmds["prefect"].index("--host") + 1] == "127.0.0.1"
    monkeypatch.delenv("PREFECT_SERVER_API_HOST", raising=False)
    env.configure(tmp_path)
    assert os.environ["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert "127.0.0.1" in (ROOT / "scripts" / "deploy_proof.sh").read_text()


def test_no_secret_or_home_path_lands_in_mlflow_params(tmp_path: Path) -> None:
    tracker = tracking.Tracker(tmp_path)
    run = tracker.start_run("t")
    home = str(Path.home())
    tracker.log_params(
        run,
        {
            "download.cifar10_url": "https://ann:s3cret@mirror.example/c.tar.gz",
            "api_token": "abc123",
            "weights": f"{home}/.cache/torch/w.pth",
        },
    )
    params = tracker.client.get_run(run).data.params
    assert "s3cret" not in str(params) and "abc123" not in str(params)
    assert params["weights"] == "~/.cache/torch/w.pth" and params["api_token"] == "***"


# ---------------------------------------------------------------- corrupt state
def test_locked_mlflow_db_is_waited_out(tmp_path: Path, caplog) -> None:
    tracking.Tracker(tmp_path).experiment_id()  # create the store
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sqlite3, time
        con = sqlite3.connect({str(tmp_path / "mlflow.db")!r}, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(8)  # longer than sqlite's own 5 s busy timeout inside MLflow
        con.execute("COMMIT")
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.time()
    with caplog.at_level(logging.WARNING):
        run = tracking.Tracker(tmp_path).start_run("while-locked")
    holder.wait()
    assert run and time.time() - t0 >= 5.0
    assert "locked by another process" in caplog.text
    assert sqlite3.connect(tmp_path / "mlflow.db").execute("select count(*) from runs").fetchone()[0] == 1


# ---------------------------------------------------------------- hostile archives
def _tar(tmp_path: Path, name: str, **kind) -> Path:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo(name)
        if "link" in kind:
            info.type, info.linkname = tarfile.SYMTYPE, kind["link"]
            tf.addfile(info)
        else:
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    return path


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("../escape.txt", {}),
        ("/etc/evil.txt", {}),
        ("data/up", {"link": "../../outside"}),
        ("data/abs", {"link": "/etc"}),
    ],
)
def test_tar_entries_escaping_the_target_are_rejected(tmp_path: Path, name: str, kind: dict) -> None:
    with pytest.raises(UnsafeArchiveError):
        extract(_tar(tmp_path, name, **kind), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.txt").exists()


def test_zip_symlink_entry_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("data/link")
        info.external_attr = 0o120777 << 16  # a symlink
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        extract(path, tmp_path / "out")


# ---------------------------------------------------------------- SIGKILL during training
_TRAIN = """
import sys, time
from pathlib import Path
from flows.config import build_config
from storage.stage import load_manifest
from tasks import train
prep = load_manifest(sys.argv[1])
cfg = build_config("tiny", ["train.max_steps=6", "train.checkpoint_every=2"])
def slow(step):
    print("step", step, flush=True)
    if len(sys.argv) > 3 and step == int(sys.argv[3]):
        time.sleep(120)  # the parent kills us here
train.run(train.plan(cfg.train, cfg.seed, "average", prep, Path(sys.argv[2])), on_step=slow)
print("done", flush=True)
"""


def test_sigkill_during_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    cfg = build_config("tiny")
    dl = download.run(download.plan(cfg.download, cfg.seed, tmp_path / "data")).manifest
    prep = prepare.run(prepare.plan(cfg.prepare, cfg.seed, dl, None, tmp_path / "data")).manifest
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}

    def train(workdir: Path, kill_at: int | None = None) -> None:
        args = [sys.executable, "-c", _TRAIN, prep["folder"], str(workdir)] + ([str(kill_at)] if kill_at else [])
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        if kill_at is None:
            assert proc.wait(timeout=600) == 0
            return
        for line in proc.stdout:
            if line.strip() == f"step {kill_at}":
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait()
        assert proc.returncode == -signal.SIGKILL

    train(tmp_path / "a")
    train(tmp_path / "b", kill_at=5)  # after the step-4 checkpoint, mid-way to the next
    train(tmp_path / "b")
    small = build_config("tiny", ["train.max_steps=6", "train.checkpoint_every=2"])
    plan = train_stage.plan(small.train, small.seed, "average", prep, tmp_path / "a")
    a = load_model(tmp_path / "a" / "train" / plan["key"]).state_dict()
    b = load_model(tmp_path / "b" / "train" / plan["key"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p for p in (tmp_path / "b").rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert leftovers == []
