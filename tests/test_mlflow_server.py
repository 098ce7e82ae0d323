"""A shared MLflow: the pipeline, the registry and `colorize image` through a real `mlflow server
--serve-artifacts` on 127.0.0.1 (COLORIZE_MLFLOW_URI), with nothing written to the work dir's own store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from flows.pipeline import pipeline


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--serve-artifacts"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield uri, root / "artifacts"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_runs_models_and_colorize_image_go_through_the_server(
    server, prefect_harness, tmp_path: Path, monkeypatch, capsys
) -> None:
    uri, artifacts = server
    monkeypatch.setenv("COLORIZE_MLFLOW_URI", uri)
    wd = tmp_path / "work"
    result = pipeline(dataset="sample", preset="tiny", overrides=["train.variants=max"], workdir=str(wd))
    assert result["registered"]["version"] >= 1
    assert not (wd / "mlflow.db").exists() and not (wd / "mlartifacts").exists()  # nothing local
    assert any(artifacts.rglob("MLmodel")) and any(artifacts.rglob("samples.png"))  # stored by the server

    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("colorizer", "champion")
    assert version.tags["variant"] == "max"
    child = client.get_run(version.run_id)
    assert "test_rgb_mse" in child.data.metrics and child.data.params["variant"] == "max"
    assert "evaluation" in {a.path for a in client.list_artifacts(result["mlflow_parent_run_id"])}

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "photo_color.png"
    assert main(["image", str(photo), "--out", str(out), "--workdir", str(wd)]) == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 48)
