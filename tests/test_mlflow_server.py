"""A shared MLflow: the pipeline, the registry and `colorize image` through a real `mlflow server
--serve-artifacts` on 127.0.0.1 (COLORIZE_MLFLOW_URI), with nothing written to the work dir's own store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import copy_prepared
from PIL import Image

from flows.cli import main
from flows.pipeline import pipeline


def test_runs_models_and_colorize_image_go_through_the_server(
    mlflow_server, tiny_prepared: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    uri, artifacts = mlflow_server
    monkeypatch.setenv("COLORIZE_MLFLOW_URI", uri)
    wd = copy_prepared(tiny_prepared, tmp_path / "work")
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
