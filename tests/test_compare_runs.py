"""scripts/compare_runs.py's arguments, checked before any work: each mistake is one line on stderr and
exit status 2, with no table printed. (Its comparisons and grid on real runs: tests/test_study_flow.py.)"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.metrics import BASELINE, COLUMNS, COMPARED, METRICS

SCRIPT = Path(__file__).parents[1] / "scripts" / "compare_runs.py"


def _load():
    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, lpips: bool, images: int = 6) -> Path:
    """An evaluate folder's per_image.csv: the baseline and one model of variant ``max``, LPIPS recorded
    as missing (empty cells, as pandas writes NaN) unless ``lpips``."""
    folder.mkdir(parents=True)
    with open(folder / "per_image.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["model", "image", *COLUMNS])
        w.writeheader()
        for model, shift in ((BASELINE, 0.0), ("max", 0.001)):
            for i in range(images):
                values = {c: 0.1 + 0.01 * i + shift for c in COLUMNS}
                w.writerow({"model": model, "image": i, **values, "lpips": values["lpips"] if lpips else ""})
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> list[str]:
    return [str(_run(tmp_path / "a", lpips=False)), str(_run(tmp_path / "b", lpips=True))]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--metrics", "bogus"], "--metrics: unknown metric 'bogus'"),
        (["--metrics", "rgb_mse", "lpips"], "--metrics: lpips has no number for every test image of"),
        (["--grid-images", "0"], "--grid-images must be at least 1, got 0"),
        (["--grid-stride", "0"], "--grid-stride must be at least 1, got 0"),
        (["--grid", "g.png", "--grid-images", "-3"], "--grid-images must be at least 1, got -3"),
    ],
)
def test_a_bad_argument_is_one_line_on_stderr_and_exit_2_before_any_table(
    runs: list[str], extra: list[str], said: str, capsys
) -> None:
    assert _load().main([*runs, "--variant", "max", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before any work: no table
    assert err.count("\n") == 1 and err.startswith("error: ") and said in err, err


def test_the_script_itself_refuses_an_unknown_metric_with_exit_2(runs: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *runs, "--variant", "max", "--metrics", "bogus"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=SCRIPT.parents[1],
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])},
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "unknown metric 'bogus'" in done.stderr, done.stderr


def test_by_default_the_runs_are_compared_on_the_tables_compared_metrics(runs: list[str], capsys) -> None:
    """Every metric model.metrics marks compared (not LPIPS, missing in one run here); any column of the
    table can be named, LPIPS too where every run scored it."""
    compare_runs = _load()
    assert compare_runs.main([*runs, "--variant", "max"]) == 0
    out = capsys.readouterr().out
    assert "| model | " + " | ".join(METRICS[m].header for m in COMPARED) + " |" in out
    assert "lpips" not in out and "| B - A | rgb_mse |" in out and "| A - grey | ab_hist |" in out
    assert compare_runs.main([runs[1], runs[1], "--variant", "max", "--metrics", "lpips", "colorfulness"]) == 0
    out = capsys.readouterr().out
    assert "| B - A | lpips | +0 |" in out and "| A - grey | colorfulness |" in out
    assert math.isnan(compare_runs.per_image(Path(runs[0]), "lpips")[BASELINE][None][0])
