"""The study path end to end on the tiny preset: seeds as separate cached train stages, a failed seed
rerun alone, and the evaluate and register stages' study outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import copy_prepared

from flows.cli import main
from flows.pipeline import StageFailed, pipeline
from model.metrics import BASELINE

# no test here reads the ONNX export: registered for the torch engine only (seconds less per register)
ARGS = {
    "dataset": "sample",
    "preset": "tiny",
    "overrides": ["train.variants=concat,max", "train.seeds=0,1", "register.onnx=false"],
}


def _states(result: dict) -> dict[str, str]:
    return {c["stage"]: c["state"] for c in result["calls"]}


@pytest.fixture(scope="module")
def workdir(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_prepared(tiny_prepared, tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def runs(workdir: Path) -> list[dict]:
    """First run: seed 1 of `max` fails (an injected fault); then the rerun; then a third, unchanged."""
    import tasks.train as train_mod

    real = train_mod.train_variant

    def failing(out, plan, *args, **kw):
        if (plan["facts"]["variant"], plan["facts"]["seed"]) == ("max", 1):
            raise RuntimeError("injected fault: the node went away")
        return real(out, plan, *args, **kw)

    train_mod.train_variant = failing
    try:
        with pytest.raises(StageFailed, match="training failed for max-seed1"):
            pipeline(**ARGS, workdir=str(workdir))
    finally:
        train_mod.train_variant = real
    return [pipeline(**ARGS, workdir=str(workdir)), pipeline(**ARGS, workdir=str(workdir))]


def test_each_variant_and_seed_is_its_own_stage_and_a_failed_seed_reruns_alone(runs: list[dict]) -> None:
    rerun, third = runs
    assert _states(rerun) == {
        "download": "cached",
        "upscale": "cached",
        "prepare": "cached",
        "train-concat-seed0": "cached",
        "train-concat-seed1": "cached",
        "train-max-seed0": "cached",
        "train-max-seed1": "ran",
        "evaluate": "ran",
        "register": "ran",
    }
    assert set(_states(third).values()) == {"cached"}
    folders = {rerun["stages"][f"train-max-seed{s}"] for s in (0, 1)}
    assert len(folders) == 2  # two trainings, two keys


def test_evaluate_reports_seeds_paired_intervals_and_a_plot(runs: list[dict]) -> None:
    rerun = runs[0]
    folder = Path(rerun["stages"]["evaluate"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [(r["variant"], r["seed"]) for r in metrics["rows"]] == [
        (BASELINE, None),
        ("concat", 0),
        ("concat", 1),
        ("max", 0),
        ("max", 1),
    ]
    by_variant = {r["variant"]: r for r in metrics["variants"]}
    for v in ("concat", "max"):
        seeds = [r["rgb_mse"] for r in metrics["rows"] if r["variant"] == v]
        assert by_variant[v]["n_seeds"] == 2 and by_variant[v]["rgb_mse"] == pytest.approx(sum(seeds) / 2)
        assert by_variant[v]["rgb_mse_std"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2**0.5)
    pairs = {(c["a"], c["b"]) for c in metrics["comparisons"] if c["metric"] == "rgb_mse"}
    assert pairs == {("concat", "max"), ("concat", BASELINE), ("max", BASELINE)}
    for c in metrics["comparisons"]:
        assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"] and c["n_images"] == metrics["rows"][0]["n_images"]
    md = (folder / "metrics.md").read_text()
    assert "95% interval" in md and "| concat - max | rgb_mse |" in md
    per_image = (folder / "per_image.csv").read_text().splitlines()
    assert len(per_image) == 1 + 5 * metrics["rows"][0]["n_images"]  # header + baseline and four models
    assert (folder / "study.png").stat().st_size > 10_000


def test_the_champion_variant_is_chosen_by_its_mean_over_seeds(runs: list[dict], workdir: Path, capsys) -> None:
    rerun = runs[0]
    reg = rerun["registered"]
    metrics = json.loads((Path(rerun["stages"]["evaluate"]) / "metrics.json").read_text())
    means = {r["variant"]: r["rgb_mse"] for r in metrics["variants"] if r["variant"] != BASELINE}
    assert reg["variant"] == min(means, key=means.get) and reg["value"] == pytest.approx(means[reg["variant"]])
    assert reg["n_seeds"] == 2
    seeds = {r["seed"]: r["rgb_mse"] for r in metrics["rows"] if r["variant"] == reg["variant"]}
    assert reg["seed"] == min(seeds, key=seeds.get)  # the registered model: that variant's best seed
    argv = ["run", "--preset", "tiny", "--variants", "concat,max", "--seeds", "0,1", "--set", "register.onnx=false"]
    assert main([*argv, "--workdir", str(workdir)]) == 0
    assert f"(mean of 2 seeds; registered: seed {reg['seed']})" in capsys.readouterr().out


def test_compare_runs_pairs_evaluations_of_the_same_images_and_draws_their_pictures(
    runs: list[dict], workdir: Path, tmp_path: Path, capsys
) -> None:
    """scripts/compare_runs.py on the study's evaluation and a second one of the same models with another
    grid size (which changes no score): each run's means, every paired difference (here 0, not
    significant), and the picture grid with a column per run. A decoding temperature, which a regression
    model ignores, makes no second evaluation (nor a second registered version): its stages are cached."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location(
        "compare_runs", Path(__file__).parents[1] / "scripts" / "compare_runs.py"
    )
    compare_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_runs)
    vivid = pipeline(**{**ARGS, "overrides": [*ARGS["overrides"], "evaluate.temperature=0.2"]}, workdir=str(workdir))
    assert vivid["stages"]["evaluate"] == runs[0]["stages"]["evaluate"]
    assert _states(vivid)["evaluate"] == _states(vivid)["register"] == "cached"
    assert vivid["registered"]["version"] == runs[0]["registered"]["version"]
    again = pipeline(**{**ARGS, "overrides": [*ARGS["overrides"], "evaluate.grid_images=2"]}, workdir=str(workdir))
    a, b = Path(runs[0]["stages"]["evaluate"]), Path(again["stages"]["evaluate"])
    assert a != b
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert compare_runs.main([str(a), str(b), "--variant", "max", "--labels", "T1", "T2", "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    # the same models on the same images: no difference (the interval still resamples each run's seeds)
    assert re.search(r"\| T2 - T1 \| rgb_mse \| \+0 \| \[\S+, \S+\] \| \S+ \| no \|", out), out
    assert "| T1 - grey | ab_hist |" in out
    width, height = Image.open(grid).size
    tile = width // 4  # four columns: gray | T1 | T2 | truth, one row per test image
    assert width == 4 * tile and height % tile == 0 and 1 <= height // tile <= 8
    assert compare_runs.main([str(a), str(tmp_path), "--variant", "max"]) == 2
