"""The `colorize` command: bad input is one line and exit 2 before any work; runs reuse finished stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from storage.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return int(exc.code)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["run", "--until", "deploy"], "--until: unknown stage 'deploy'"),
        (["run", "--force", "nope"], "--force: unknown stage 'nope'"),
        (["run", "--preset", "huge"], "unknown preset 'huge'"),
        (["run", "--variants", "concat,sum"], "train.variants"),
        (["run", "--set", "train.batch_size=-4"], "train.batch_size"),
        (["run", "--set", "prepare.image_size=100"], "multiple of 32"),
        (["run", "--set", "download.crops=3"], "download.crops: unknown setting"),
        (["run", "--set", "novalue"], "expects key=value"),
        (["run", "--dataset", "folder"], "needs --path"),
        (["run", "--dataset", "folder", "--path", "/does/not/exist"], "no such folder"),
        (["run", "--workdir", "/proc/forbidden"], "not writable"),
        (["run", "--workdir", "/sys/colorize-readonly"], "not writable"),  # a read-only mount
        (["frobnicate"], "invalid choice"),
        # found by hostile testing: each was a traceback or a late failure
        (["run", "--set", "seed=-1"], "seed"),
        (["run", "--set", "download.lowres_crop_fraction=[0.5,2]"], "lowres_crop_fraction"),
        (["run", "--set", "register.model_name="], "register.model_name"),
        (["run", "--set", "register.model_name=a/b"], "register.model_name"),
        (["run", "--set", "register.alias="], "register.alias"),
        (["run", "--set", "prepare.image_size=32000"], "prepare.image_size"),
        (["run", "--set", "train.batch_size=1"], "train.batch_size"),
        (["run", "--set", "upscale.weights=/etc/passwd"], "upscale.weights"),
        (["image", "x.png", "--size", "-32"], "--size"),
        (["image", "x.png", "--max-pixels", "0"], "--max-pixels"),
        (["image", "x.png", "--max-pixels", "-5"], "--max-pixels"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys, tmp_path: Path) -> None:
    if "--workdir" not in argv and argv[0] == "run":
        argv = [*argv, "--workdir", str(tmp_path / "w")]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w" / "download").exists()  # nothing ran


def test_run_until_download_writes_manifest_and_second_run_reuses_it(prefect_harness, tmp_path: Path, capsys) -> None:
    argv = ["run", "--dataset", "sample", "--preset", "tiny", "--until", "download", "--workdir", str(tmp_path)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    manifests = list((tmp_path / "download").glob("*/manifest.json"))
    assert len(manifests) == 1
    m = json.loads(manifests[0].read_text())
    assert set(m["sets"]) == {"lowres", "highres"} and m["dataset"] == "sample"
    assert "download         ran" in first
    assert main(argv) == 0
    assert "download         cached" in capsys.readouterr().out
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    assert "download   cached" in capsys.readouterr().out


def test_overrides_never_leak_into_the_presets() -> None:
    from flows.config import PRESETS, build_config

    before = json.dumps(PRESETS, sort_keys=True)
    assert build_config("tiny", ["train.variants=max", "train.lr=0.5"]).train.variants == ["max"]
    assert json.dumps(PRESETS, sort_keys=True) == before
    assert build_config("tiny").train.variants == ["concat", "average", "max"]


def test_help_lists_the_choices_without_importing_torch() -> None:
    """`colorize --help` and `colorize run --help` read stages, variants, datasets, engines and devices
    from light modules: no torch (seconds) before the first line of help."""
    code = (
        "import sys\nfrom flows.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['image', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stderr.strip() == "False", out.stderr[-2000:]
    for name in ("concat, average, max", "download, upscale, prepare", "sample", "--engine {auto,torch,onnx}"):
        assert name in out.stdout, name


def test_the_classification_head_takes_no_regression_loss() -> None:
    from flows.config import build_config

    assert build_config("tiny", ["train.head=classification"]).train.head == "classification"
    with pytest.raises(ConfigError, match="regression head's") as err:
        build_config("tiny", ["train.head=classification", "train.loss=l1"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="between 0.01 and 1"):
        build_config("tiny", ["evaluate.temperature=0"])
