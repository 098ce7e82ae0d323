"""Any x86-64 machine: the tiny pipeline, from training to a registered champion, then `colorize image`
on it, computed as this CPU computes and as older CPUs do (ATen's vector kernels, oneDNN's convolutions
and MKL limited to AVX2, then to the x86-64 baseline). onnxruntime keeps its own dispatch, so each
register's ONNX parity gate compares two different kernel families: the case that once failed on
another CPU. The three runs share one prepared dataset (they differ from training on). Each run trains
its own weights, so their photos are compared through one model: the native run's champion, on the torch
engine, under every ISA. An older ISA's runs must print no warning the native run does not (a user
could do nothing about one). The pipeline runs use the session's Prefect server.

The settings (docs/onnx_parity.md): ``ATEN_CPU_CAPABILITY`` (default | avx2 | avx512),
``ONEDNN_MAX_CPU_ISA`` (SSE41 | AVX2 | AVX512_CORE ...), ``MKL_ENABLE_INSTRUCTIONS`` (SSE4_2 | AVX2 ...).
The first two are checked to have taken effect (ATen reports its capability, oneDNN's verbose log the ISA
it dispatched to); MKL's verbose log names no ISA (and on AMD CPUs MKL takes its generic path anyway), so
that one is set but cannot be checked. An ISA that equals this CPU's own, or that cannot be forced, is
left out and the test says which and why.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_prepared
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ISAS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
# What each run's kernels report: ATen's capability, and the ISA oneDNN's verbose log says it took.
PROBE = """
import torch
x = torch.rand(2, 64, 32, 32)
with torch.no_grad():
    torch.nn.Conv2d(64, 64, 3, padding=1).eval()(x)
print("ATEN", torch.backends.cpu.get_cpu_capability())
"""
LEFT_OUT: dict[str, str] = {}  # an ISA not run, and why
WARNINGS: dict[str, set[str]] = {}  # each ISA's warning lines (keys, digits blanked), from every command it ran
RGB_LEVEL = 1 / 255  # docs/onnx_parity.md: what a user could see in the colorized photo


def _env(isa: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "COLORIZE_", "ONEDNN_", "ATEN_"))}
    return {**env, "DO_NOT_TRACK": "1", **ISAS[isa], **extra}


def _probe(isa: str) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=_env(isa, ONEDNN_VERBOSE="1"), capture_output=True, text=True, timeout=120
    )
    aten = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("ATEN"))
    onednn = next((line.split("isa:", 1)[1] for line in out.stdout.splitlines() if ",isa:" in line), "unknown")
    return aten, onednn


@pytest.fixture(scope="module")
def native() -> tuple[str, str]:
    return _probe("native")


@pytest.fixture(scope="module")
def runs(tiny_prepared: Path, native: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny pipeline per ISA (its own work dir holding the shared prepared data) and `colorize
    image` with its champion; an ISA that cannot be forced here, or that is the native one, is left
    out with the reason."""
    from prefect.settings import PREFECT_API_URL  # after the session's harness set Prefect's home

    photo = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
    done: dict[str, Path] = {}
    for isa in ISAS:
        if isa != "native":
            aten, onednn = _probe(isa)
            wanted = ISAS[isa]
            if (
                aten.lower() != wanted["ATEN_CPU_CAPABILITY"]
                or onednn.split()[-1].replace(".", "") != (wanted["ONEDNN_MAX_CPU_ISA"])
            ):
                LEFT_OUT[isa] = f"asked {wanted}, the kernels report ATen {aten}, oneDNN {onednn}: not forceable here"
                continue
            if (aten, onednn) == native:
                LEFT_OUT[isa] = f"this CPU's own ISA (ATen {aten}, oneDNN {onednn}): the native run is this run"
                continue
        workdir = copy_prepared(tiny_prepared, tmp_path_factory.mktemp(f"isa-{isa}"))
        argv = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--variants", "max"]
        argv += ["--workdir", str(workdir)]
        # on the session's Prefect server: a temporary one per run is not what this test is about
        env = _env(isa, PREFECT_API_URL=PREFECT_API_URL.value())
        out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{isa}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
        _warnings(isa, out, workdir)
        image = [sys.executable, "-m", "flows.cli", "image", str(photo), "--out", str(workdir / "photo_color.png")]
        out = subprocess.run(
            [*image, "--workdir", str(workdir)], cwd=ROOT, env=_env(isa), capture_output=True, text=True
        )
        assert out.returncode == 0, f"{isa}: {out.stderr[-3000:]}"
        _warnings(isa, out, workdir)
        done[isa] = workdir
    # One model on every ISA: the native run's champion on the torch engine (onnxruntime's dispatch
    # ignores these settings), so only the kernels differ, not the weights.
    for isa in done:
        same = [sys.executable, "-m", "flows.cli", "image", str(photo), "--out", str(done[isa] / "native_model.png")]
        same += ["--engine", "torch", "--workdir", str(done["native"])]
        out = subprocess.run(same, cwd=ROOT, env=_env(isa), capture_output=True, text=True)
        assert out.returncode == 0, f"{isa}: {out.stderr[-3000:]}"
    return done


def _warnings(isa: str, out: subprocess.CompletedProcess, workdir: Path) -> None:
    """What torch, onnxruntime, ncnn and the product warned of: a line naming a warning, its work dir
    named alike, stage keys and digits blanked (times, sizes, keys and paths differ between runs, a
    warning's text does not)."""
    lines = (out.stdout + out.stderr).replace(str(workdir), "WORKDIR").splitlines()
    found = {
        re.sub(r"[0-9a-f]{8,}|\d+", "#", line.strip()) for line in lines if re.search(r"warn", line, re.IGNORECASE)
    }
    WARNINGS.setdefault(isa, set()).update(found)


def _stage(workdir: Path, stage: str) -> dict:
    key = json.loads((workdir / stage / "last.json").read_text())["key"]
    return json.loads((workdir / stage / key / "manifest.json").read_text())


@pytest.mark.slow
def test_every_isa_registers_with_its_onnx_export_and_scores_what_the_others_score(
    runs: dict[str, Path], native: tuple[str, str]
) -> None:
    if len(runs) < 2:
        pytest.skip("; ".join(f"{isa}: {why}" for isa, why in LEFT_OUT.items()))
    for isa, why in LEFT_OUT.items():
        print(f"{isa} left out: {why}")
    registered = {isa: _stage(wd, "register") for isa, wd in runs.items()}
    for isa, reg in registered.items():
        assert reg["onnx"]["attached"], f"{isa}: ONNX parity failed: {reg['onnx']}"
    assert len({reg["variant"] for reg in registered.values()}) == 1, "the same champion on every ISA"
    tables = {isa: {r["variant"]: r for r in _rows(wd)} for isa, wd in runs.items()}
    first, *others = tables
    for isa in others:
        for variant, row in tables[first].items():
            other = tables[isa][variant]
            # A prediction that moved by at most one level everywhere moves the RGB MSE by at most
            # 2 * level * RMSE + level^2 (Cauchy-Schwarz), and the PSNR by what that MSE change gives.
            mse, level = row["rgb_mse"], RGB_LEVEL
            bound = 2 * level * math.sqrt(mse) + level**2
            assert abs(other["rgb_mse"] - mse) <= bound, (isa, variant, other["rgb_mse"], mse)
            psnr_bound = 10 * math.log10((mse + bound) / mse)
            assert abs(other["psnr"] - row["psnr"]) <= psnr_bound, (isa, variant)
    # Each ISA trains its own weights, and float noise grows over training: each champion colorizes the
    # photo (measured: up to 2/255 apart on an AVX-512 CPU), but the pixel-level bound belongs to one
    # model run on every ISA's kernels (measured: identical).
    for isa, wd in runs.items():
        assert np.asarray(Image.open(wd / "photo_color.png")).shape == (48, 64, 3), isa
    photos = {isa: np.asarray(Image.open(wd / "native_model.png"), dtype=np.int16) for isa, wd in runs.items()}
    for isa in others:
        assert np.abs(photos[isa] - photos[first]).max() <= 1, f"{isa}: the native model's photo moved by over 1/255"
    # An older CPU shows its user nothing new: no warning (from torch, onnxruntime, ncnn or the product)
    # that this CPU's run did not print too, since a user could do nothing about it.
    for isa in others:
        new = WARNINGS[isa] - WARNINGS[first]
        assert not new, f"{isa} warns of what {first} does not: {new}"


def _rows(workdir: Path) -> list[dict]:
    key = json.loads((workdir / "evaluate" / "last.json").read_text())["key"]
    return json.loads((workdir / "evaluate" / key / "metrics.json").read_text())["rows"]
