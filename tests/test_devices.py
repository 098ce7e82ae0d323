"""Inference on the device the user asks for: ``--device auto|cpu|cuda``. On a machine without a GPU these
pin the selection logic and the one-line refusal; the GPU figures come from scripts/gpu_check.sh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from flows.cli import main
from model.inference import device_of, predict, resolve_device

NO_GPU = not torch.cuda.is_available()


def test_auto_takes_a_visible_gpu_and_the_cpu_otherwise(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible: --device cuda is valid here")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path: Path, model_dir: Path, capsys) -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    photo = tmp_path / "p.png"
    Image.fromarray(data.chelsea()[:64, :64]).save(photo)
    out = tmp_path / "o.png"
    assert main(["image", str(photo), "--out", str(out), "--model", str(model_dir), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "no CUDA device" in err[0]
    assert not out.exists()


def test_bf16_is_the_torch_engines_and_stays_close_to_float32(tmp_path: Path, model_dir: Path, capsys) -> None:
    from model.colorizer import load_folder
    from model.inference import Bf16Net, colorize, with_precision

    photo = tmp_path / "p.png"
    Image.fromarray(data.chelsea()[:64, :64]).save(photo)
    argv = ["image", str(photo), "--out", str(tmp_path / "o.png"), "--model", str(model_dir), "--engine", "onnx"]
    assert main([*argv, "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine onnx runs in float32" in err[0]
    net = load_folder(model_dir)
    fast = with_precision(net, "bf16")
    assert isinstance(fast, Bf16Net) and with_precision(fast, "bf16") is fast and with_precision(net, "fp32") is net
    rgb = data.astronaut()
    diff = np.abs(colorize(fast, rgb, 32).astype(int) - colorize(net, rgb, 32).astype(int))
    assert diff.max() <= 8 and diff.mean() < 1  # bf16 keeps 8 bits of mantissa: a few levels at most


def test_onnxruntime_is_never_asked_to_run_on_a_gpu(tmp_path: Path, model_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    photo = tmp_path / "p.png"
    Image.fromarray(data.chelsea()[:64, :64]).save(photo)
    argv = ["image", str(photo), "--out", str(tmp_path / "o.png"), "--model", str(model_dir), "--engine", "onnx"]
    assert main(argv) == 2
    assert "--engine onnx runs on the CPU" in capsys.readouterr().err


def test_the_batch_runs_where_the_network_is_and_comes_back_on_the_cpu(model_dir: Path) -> None:
    from model.colorizer import load_folder

    net = load_folder(model_dir)
    photos = [data.chelsea()[:40, :56], data.astronaut()[:64, :48]]
    x, ab = predict(net, photos, 32)
    assert device_of(net) == torch.device("cpu") and x.device.type == ab.device.type == "cpu"
    with torch.inference_mode():
        assert torch.equal(ab, net(x).float())  # the same numbers as calling the network directly
    if not NO_GPU:
        x_gpu, ab_gpu = predict(net.to("cuda"), photos, 32)
        assert ab_gpu.device.type == "cpu" and np.abs((ab_gpu - ab).numpy()).max() * 110 < 1  # < 1 Lab unit


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible: evaluate.device=cuda is valid here")
def test_evaluate_on_cuda_without_a_gpu_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    argv = ["run", "--preset", "tiny", "--set", "evaluate.device=cuda", "--workdir", str(tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate.device" in err[0] and "no CUDA device" in err[0]
    assert not (tmp_path / "w" / "download").exists()


def test_the_evaluate_key_says_where_the_networks_ran(monkeypatch, tmp_path: Path) -> None:
    from tasks import evaluate

    prepared = {"stage": "prepare", "key": "k", "content": "c"}
    cpu = evaluate.plan(evaluate.Settings(device="cpu"), prepared, [], tmp_path)
    assert cpu["facts"]["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = evaluate.plan(evaluate.Settings(device="auto"), prepared, [], tmp_path)
    assert gpu["facts"]["device"] == "cuda" and gpu["key"] != cpu["key"]


@pytest.mark.slow
def test_the_gpu_check_cut_by_sigterm_returns_what_it_measured_and_leaves_nothing(tmp_path: Path) -> None:
    """A lent GPU's time limit ends the check with SIGTERM: the report then holds every finished part
    and the cut one, the scratch folder is gone, nothing lands in the checkout, and no progress bar
    floods the output."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    cmd = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--parts", "train_tiny"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "report.json").exists() and time.monotonic() < deadline:  # env has been reported
        time.sleep(0.2)
    time.sleep(2)  # inside train_tiny
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    parts = {p["name"]: p["status"] for p in json.loads((out / "report.json").read_text())["parts"]}
    assert parts == {"env": "ok", "train_tiny": "cut"}
    assert "| train_tiny | cut |" in (out / "report.md").read_text()
    assert not list(scratch.glob("gpu-check-*")), "the check's scratch folder was left behind"
    assert not (root / "gpu-check").exists() and "step/s" not in output  # no report in the checkout, no bars
