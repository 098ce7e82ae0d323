"""The Prefect DAG end to end with the `tiny` preset: caching, rerunning one failed stage, the registry,
and `colorize image` with the champion. Assertions are on executions (task states), not on logs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMIUM, copy_prepared, serve_cli, stop_cli
from PIL import Image
from skimage import data

from flows.cli import main
from flows.pipeline import StageFailed, pipeline


def _states(result: dict) -> dict[str, str]:
    return {c["stage"]: c["state"] for c in result["calls"]}


@pytest.fixture(scope="module")
def workdir(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_prepared(tiny_prepared, tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def first_run(workdir: Path) -> dict:
    """The first run, in which training of the `max` variant fails (an injected fault)."""
    import tasks.train as train_mod

    real = train_mod.train_variant

    def failing(out, plan, *args, **kw):
        if plan["facts"]["variant"] == "max":
            raise RuntimeError("injected fault: out of memory")
        return real(out, plan, *args, **kw)

    train_mod.train_variant = failing
    try:
        with pytest.raises(StageFailed, match="training failed for max"):
            pipeline(dataset="sample", preset="tiny", workdir=str(workdir))
    finally:
        train_mod.train_variant = real
    return json.loads((workdir / "train" / "last.json").read_text())


@pytest.fixture(scope="module")
def rerun(first_run: dict, workdir: Path) -> dict:
    return pipeline(dataset="sample", preset="tiny", workdir=str(workdir))


def test_failed_variant_is_recorded(first_run: dict) -> None:
    assert first_run["state"] == "failed" and "injected fault" in first_run["error"]


def test_rerun_executes_only_the_failed_variant_and_what_depends_on_it(rerun: dict) -> None:
    states = _states(rerun)
    assert states == {
        "download": "cached",
        "upscale": "cached",
        "prepare": "cached",
        "train-concat": "cached",
        "train-average": "cached",
        "train-max": "ran",
        "evaluate": "ran",
        "register": "ran",
    }


def test_run_ends_with_a_registered_champion(rerun: dict, workdir: Path) -> None:
    reg = rerun["registered"]
    assert reg["model_name"] == "colorizer" and reg["alias"] == "champion"
    assert reg["variant"] in ("concat", "average", "max")
    table = (Path(rerun["metrics_md"])).read_text()
    assert "| grayscale baseline |" in table and table.count("\n| ") >= 4
    evaluated = json.loads((Path(rerun["stages"]["evaluate"]) / "metrics.json").read_text())
    assert evaluated["rows"][0]["variant"] == "grayscale baseline"
    assert evaluated["rows"][0]["colorfulness"] < 1  # ab = 0 has no colour


def test_the_flow_run_page_shows_the_table_the_champion_and_the_stages_progress(rerun: dict) -> None:
    """Prefect artifacts of that run (its flow-run id): the evaluate table as markdown, the champion, and
    progress artifacts that the shard mapping and training filled to 100%. The rerun trains only the
    variant that failed before; the first run's cached stages report no progress."""
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.run_page import CHAMPION_KEY, EVALUATION_KEY

    async def read(run_id: str) -> list:
        async with get_client() as client:
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)]))
            return await client.read_artifacts(flow_run_filter=runs, limit=200)

    arts = asyncio.run(read(rerun["flow_run_id"]))
    by_key = {a.key: a for a in arts if a.key}
    assert by_key[EVALUATION_KEY].data == Path(rerun["metrics_md"]).read_text()
    champion = by_key[CHAMPION_KEY].data
    reg = rerun["registered"]
    assert f"# Champion: colorizer version {reg['version']}" in champion and "models:/colorizer@champion" in champion
    finished = [a.description for a in arts if a.type == "progress" and float(a.data) == 100.0]
    assert len(finished) == 1 and finished[0].startswith("train: max: step 3 of 3, loss "), finished


def test_mlflow_holds_parent_and_child_runs_with_metrics_and_images(rerun: dict, workdir: Path) -> None:
    from storage.tracking import Tracker

    c = Tracker(workdir).client
    parent = c.get_run(rerun["mlflow_parent_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] not in ("", "unknown")
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["variant"] for r in children} == {"max"}  # this run trained max; others were cached
    run = children[0]
    assert "train_loss" in run.data.metrics and "val_loss" in run.data.metrics and "test_rgb_mse" in run.data.metrics
    assert run.data.params["variant"] == "max" and run.data.tags["pretrained"] == "False"
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"samples.png", "loss_curve.png"}
    history = c.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == sorted(m.step for m in history) and len(history) >= 2


def test_second_identical_run_is_all_cache_hits(rerun: dict, workdir: Path) -> None:
    again = pipeline(dataset="sample", preset="tiny", workdir=str(workdir))
    assert set(_states(again).values()) == {"cached"}
    assert again["registered"]["version"] == rerun["registered"]["version"]


def test_changing_a_training_setting_reruns_training_onward_only(rerun: dict, workdir: Path) -> None:
    result = pipeline(dataset="sample", preset="tiny", workdir=str(workdir), overrides=["train.lr=0.002"])
    states = _states(result)
    assert [states[s] for s in ("download", "upscale", "prepare")] == ["cached"] * 3
    assert all(states[f"train-{v}"] == "ran" for v in ("concat", "average", "max"))
    assert states["evaluate"] == states["register"] == "ran"


def test_editing_a_stage_reruns_it_and_only_changed_outputs_propagate(rerun: dict, workdir: Path, monkeypatch) -> None:
    import tasks.prepare as prep_mod

    real = prep_mod.code_version
    monkeypatch.setattr(prep_mod, "code_version", lambda *mods: real(*mods) + "-edited")
    states = _states(pipeline(dataset="sample", preset="tiny", workdir=str(workdir)))
    assert states["prepare"] == "ran" and states["upscale"] == "cached"
    # the edited stage wrote byte-identical data, so nothing downstream of it had to run again
    assert states["train-concat"] == "cached" and states["evaluate"] == "cached"


def test_force_reruns_a_stage_despite_its_cache(rerun: dict, workdir: Path) -> None:
    states = _states(
        pipeline(dataset="sample", preset="tiny", workdir=str(workdir), until="download", force=["download"])
    )
    assert states == {"download": "ran"}


def test_deleted_stage_folder_is_recomputed_not_trusted(rerun: dict, workdir: Path) -> None:
    shutil.rmtree(rerun["stages"]["evaluate"])
    states = _states(pipeline(dataset="sample", preset="tiny", workdir=str(workdir)))
    assert states["evaluate"] == "ran" and states["train-max"] == "cached"
    assert (Path(rerun["stages"]["evaluate"]) / "manifest.json").exists()


def test_only_runs_one_stage_and_needs_finished_inputs(rerun: dict, workdir: Path, tmp_path: Path) -> None:
    states = _states(
        pipeline(dataset="sample", preset="tiny", workdir=str(workdir), only="evaluate", force=["evaluate"])
    )
    assert states["evaluate"] == "ran" and "register" not in states
    with pytest.raises(StageFailed, match="--only train needs a finished download stage"):
        pipeline(dataset="sample", preset="tiny", workdir=str(tmp_path / "empty"), only="train")


def test_registered_model_loads_with_only_what_its_requirements_provide(rerun: dict, workdir: Path, tmp_path) -> None:
    """In a fresh process whose imports are limited to the distributions its requirements.txt installs
    (and their own requirements), the champion loads from its own code folder and colorizes."""
    import mlflow

    from storage.code_identity import PACKAGES, ROOT
    from storage.dependencies import closure, provided_modules

    uri = f"sqlite:///{workdir}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    reqs_file = mlflow.artifacts.download_artifacts(  # the one file, into this test's own folder
        artifact_uri="models:/colorizer@champion/requirements.txt", dst_path=str(tmp_path)
    )
    reqs = [r.strip() for r in Path(reqs_file).read_text().splitlines() if r.strip() and not r.startswith(("#", "-"))]
    assert {r.split("==")[0] for r in reqs} >= {"torch", "mlflow", "tqdm", "onnxruntime"}  # tqdm: via storage.fetch
    assert not {r.split("==")[0] for r in reqs} & {"prefect", "webdataset", "s3fs", "gradio"}  # not the model's
    dists = closure(reqs)
    request = {
        "distributions": sorted(dists),
        "allowed": sorted(provided_modules(dists)),
        "project": list(PACKAGES),
        "source": str(ROOT),
        "tracking_uri": uri,
        "model_uri": "models:/colorizer@champion",
    }
    script = Path(__file__).with_name("limited_imports.py")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(script)], input=json.dumps(request), capture_output=True, text=True, timeout=300,
        cwd=workdir, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [3, 40, 72, 3] and result["dtype"] == "uint8"
    assert result["loaded_from"]["model.pyfunc"].endswith("/code/model/pyfunc.py")
    assert not any(Path(f).is_relative_to(ROOT) for f in result["loaded_from"].values()), result["loaded_from"]


# ---------------------------------------------------------------- colorize image
def _photos(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(data.chelsea()[:120, :160])
    files = {
        "gray.png": rgb.convert("L"),
        "rgb.jpg": rgb,
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "cmyk.tif": rgb.convert("CMYK"),
        "sixteen.png": Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257),
    }
    paths = {}
    for name, im in files.items():
        im.save(folder / name)
        paths[name] = folder / name
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb.save(folder / "rotated.jpg", exif=exif)
    paths["rotated.jpg"] = folder / "rotated.jpg"
    return paths


def test_colorize_image_accepts_every_input_kind(rerun: dict, workdir: Path, tmp_path: Path, capsys) -> None:
    photos = _photos(tmp_path / "in")
    rgba = np.asarray(Image.open(photos["rgba.png"]))
    rgba_alpha = rgba.copy()
    rgba_alpha[:20, :20, 3] = 0
    Image.fromarray(rgba_alpha).save(photos["rgba.png"])
    code = main(["image", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workdir", str(workdir)])
    assert code == 0, capsys.readouterr().err
    out = {p.name: Image.open(p) for p in (tmp_path / "out").iterdir()}
    assert set(out) == {"gray.png", "rgb.jpg", "rgba.png", "palette.png", "cmyk.tif", "sixteen.png", "rotated.jpg"}
    assert out["rgb.jpg"].size == (160, 120) and out["rgb.jpg"].mode == "RGB"  # full resolution
    assert out["rotated.jpg"].size == (120, 160)  # EXIF rotation applied
    assert out["rgba.png"].mode == "RGBA" and np.asarray(out["rgba.png"])[:20, :20, 3].max() == 0  # alpha kept
    # the original L is kept: lightness of output equals the input's
    from skimage.color import rgb2lab

    src = np.asarray(Image.open(photos["rgb.jpg"]).convert("RGB"))
    got = np.asarray(out["rgb.jpg"].convert("RGB"))
    assert np.abs(rgb2lab(src)[..., 0] - rgb2lab(got)[..., 0]).mean() < 2.0


def test_colorize_image_bad_inputs_get_one_line_each_and_others_go_on(
    rerun: dict, workdir: Path, tmp_path: Path, capsys
) -> None:
    photos = _photos(tmp_path / "in")
    (tmp_path / "notimage.png").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(photos["gray.png"].read_bytes()[:300])
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(big)
    args = [
        "image",
        str(photos["rgb.jpg"]),
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "notimage.png"),
        str(tmp_path / "empty.jpg"),
        str(tmp_path / "trunc.png"),
        str(big),
        "--max-pixels",
        "100000",
        "--out",
        str(tmp_path / "out"),
        "--workdir",
        str(workdir),
    ]
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 5
    joined = "\n".join(err)
    for needle in (
        "missing.jpg: no such file",
        "notimage.png: not an image",
        "empty.jpg: empty file",
        "trunc.png: unreadable or truncated",
        "over the limit of 100,000",
    ):
        assert needle in joined
    assert (tmp_path / "out" / "rgb.jpg").exists()  # the good file was still colorized


def test_colorize_image_without_a_model_says_how_to_train_one(tmp_path: Path, capsys) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    assert main(["image", str(tmp_path / "a.png"), "--workdir", str(tmp_path / "fresh")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no registered model" in err and "colorize run" in err and len(err.splitlines()) == 1


def test_colorize_image_with_upscale_runs_real_esrgan_first(rerun: dict, workdir: Path, tmp_path: Path) -> None:
    Image.fromarray(data.astronaut()[::16, ::16]).save(tmp_path / "small.png")  # 32x32
    assert (
        main(
            [
                "image",
                str(tmp_path / "small.png"),
                "--upscale",
                "--out",
                str(tmp_path / "o.png"),
                "--workdir",
                str(workdir),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "o.png").size == (128, 128)


# ---------------------------------------------------------------- the work dir's MLflow store, lost or moved
def _copy(workdir: Path, dest: Path) -> Path:
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("*.lock", ".prefect"))
    return dest


def _artifact_files(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "mlartifacts").rglob("*") if p.is_file())


def test_a_lost_mlflow_db_is_rebuilt_from_the_stage_folders(rerun: dict, workdir: Path, tmp_path: Path) -> None:
    lost = _copy(workdir, tmp_path / "lost")
    (lost / "mlflow.db").unlink()
    states = _states(pipeline(dataset="sample", preset="tiny", workdir=str(lost)))
    assert states["train-max"] == "cached" and states["register"] == "ran"
    img = tmp_path / "p.png"
    Image.fromarray(data.chelsea()[:64, :64]).save(img)
    assert main(["image", str(img), "--out", str(tmp_path / "o.png"), "--workdir", str(lost)]) == 0


def test_a_copied_or_moved_work_dir_writes_only_into_itself(rerun: dict, workdir: Path, tmp_path: Path) -> None:
    original = _artifact_files(workdir)
    copy = _copy(workdir, tmp_path / "copy")
    states = _states(pipeline(dataset="sample", preset="tiny", workdir=str(copy), overrides=["register.alias=mine"]))
    assert states["register"] == "ran"
    assert _artifact_files(workdir) == original  # nothing written into the original
    assert len(_artifact_files(copy)) > len(original)

    moved = copy.rename(tmp_path / "moved")
    again = pipeline(dataset="sample", preset="tiny", workdir=str(moved), overrides=["register.alias=mine"])
    assert set(_states(again).values()) == {"cached"}  # the registry's files were found in the moved dir
    img = tmp_path / "p.png"
    Image.fromarray(data.chelsea()[:64, :64]).save(img)
    assert main(["image", str(img), "--out", str(tmp_path / "o.png"), "--workdir", str(moved)]) == 0


# ---------------------------------------------------------------- serving the champion: ONNX, REST, the web page
def test_the_champion_is_registered_with_an_onnx_export_that_matches_torch(rerun: dict, workdir: Path, tmp_path):
    reg = json.loads((Path(rerun["stages"]["register"]) / "manifest.json").read_text())
    assert reg["onnx"]["attached"] and reg["onnx"]["max_rgb_diff"] <= 1 and rerun["registered"]["onnx_export"]
    src = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()[:120, :160]).save(src)
    outs = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.png"
        assert main(["image", str(src), "--out", str(out), "--engine", engine, "--workdir", str(workdir)]) == 0
        outs[engine] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(outs["torch"] - outs["onnx"]).max() <= 1  # within 1/255

    # bf16 is the torch engine's: auto takes torch for it even on a CPU with the export at hand
    from flows.colorize_images import Running, load_net
    from model.inference import Bf16Net

    assert isinstance(load_net(None, workdir, Running("auto", "cpu", "bf16"))[0], Bf16Net)
    out = tmp_path / "bf16.png"
    assert main(["image", str(src), "--out", str(out), "--precision", "bf16", "--workdir", str(workdir)]) == 0
    bf16 = np.asarray(Image.open(out)).astype(int)
    print("bf16 vs fp32 levels:", np.abs(bf16 - outs["torch"]).max(), np.abs(bf16 - outs["torch"]).mean())
    assert np.abs(bf16 - outs["torch"]).max() <= 8 and np.abs(bf16 - outs["torch"]).mean() < 1


def test_the_classification_head_trains_registers_and_colorizes_at_any_vividness(
    rerun: dict, workdir: Path, tmp_path: Path, capsys
) -> None:
    """train.head=classification through evaluate, register (ONNX export with the temperature as an
    input, the evaluated temperature as the version's default) and `colorize image --vividness`; the
    registered pyfunc takes the vividness as a parameter; a regression model refuses one in one line."""
    sets = ["train.head=classification", "train.variants=max", "register.model_name=vivid"]
    result = pipeline(
        dataset="sample", preset="tiny", workdir=str(workdir), overrides=[*sets, "evaluate.temperature=0.3"]
    )
    states = _states(result)
    assert [states[s] for s in ("download", "upscale", "prepare")] == ["cached"] * 3
    assert states["train-max"] == states["evaluate"] == states["register"] == "ran"
    reg = json.loads((Path(result["stages"]["register"]) / "manifest.json").read_text())
    assert reg["head"] == "classification" and reg["onnx"]["attached"] and reg["onnx"]["max_rgb_diff"] <= 1
    from storage.tracking import Tracker

    tags = Tracker(workdir).client.get_model_version("vivid", str(reg["version"])).tags
    assert tags["head"] == "classification" and float(tags["vividness"]) == 0.3

    src = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()[:96, :128]).save(src)
    model = ["--model", "models:/vivid@champion", "--workdir", str(workdir)]
    outs = {}
    for name, extra in {
        "default": [],
        "0.3": ["--vividness", "0.3"],
        "0.05": ["--vividness", "0.05"],
        "1": ["--vividness", "1"],
        "0.05 torch": ["--vividness", "0.05", "--engine", "torch"],
    }.items():
        out = tmp_path / f"{name}.png"
        assert main(["image", str(src), "--out", str(out), *model, *extra]) == 0, capsys.readouterr().err
        outs[name] = np.asarray(Image.open(out)).astype(int)
    assert np.array_equal(outs["default"], outs["0.3"])  # the version decodes at the evaluated temperature
    assert np.abs(outs["0.05"] - outs["1"]).max() > 2  # the vividness changes the colours

    def chroma(img: np.ndarray) -> float:  # how far from grey, on average (max - min channel)
        return float((img.max(-1) - img.min(-1)).mean())

    assert chroma(outs["1"]) > chroma(outs["0.05"])  # as the help says: higher vividness, more colour
    assert np.abs(outs["0.05"] - outs["0.05 torch"]).max() <= 1  # onnx (auto on a CPU) and torch agree

    import mlflow

    from flows.env import open_registry
    from storage.tracking import tracking_uri

    open_registry(workdir)
    mlflow.set_tracking_uri(tracking_uri(workdir))
    pyfunc = mlflow.pyfunc.load_model("models:/vivid@champion")
    batch = np.asarray(Image.open(src))[None]
    assert np.array_equal(pyfunc.predict(batch, params={"vividness": 0.05})[0], outs["0.05"].astype(np.uint8))
    with pytest.raises(Exception, match="between 0.01 and 1"):
        pyfunc.predict(batch, params={"vividness": 3.0})

    from flows.app import colorize_uploads, vividness_slider
    from flows.colorize_images import PhotoColorizer

    vivid = PhotoColorizer.load("models:/vivid@champion", workdir)
    assert vividness_slider(vivid) == (True, 0.3)  # the page's slider, at the version's temperature
    assert not vividness_slider(PhotoColorizer.load(None, workdir))[0]  # a regression champion has none
    (tmp_path / "page").mkdir()
    _, paths, _, _ = colorize_uploads(vivid, [str(src)], False, tmp_path / "page", vividness=0.05)
    assert np.abs(np.asarray(Image.open(paths[0])).astype(int) - outs["0.05"]).max() <= 1

    proc, base = serve_cli(["serve", "--model", "models:/vivid@champion", "--workdir", str(workdir)], "/ping")
    try:
        import urllib.request

        body = json.dumps({"inputs": batch.tolist(), "params": {"vividness": 0.05}}).encode()
        req = urllib.request.Request(base + "/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            served = np.asarray(json.loads(resp.read())["predictions"], dtype=int)
        assert np.array_equal(served[0], outs["0.05"])
    finally:
        stop_cli(proc)

    capsys.readouterr()
    assert (
        main(["image", str(src), "--out", str(tmp_path / "r.png"), "--vividness", "0.2", "--workdir", str(workdir)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "regression head" in err and "\n" not in err and not (tmp_path / "r.png").exists()
    with pytest.raises(SystemExit) as bad:
        main(["image", str(src), "--vividness", "0", *model])
    assert bad.value.code == 2 and "between 0.01 and 1" in capsys.readouterr().err


def _mismatching_engine(monkeypatch) -> None:
    from model.onnx_engine import OnnxColorizer

    real = OnnxColorizer.__call__
    monkeypatch.setattr(OnnxColorizer, "__call__", lambda self, x, t=None: real(self, x, t) + 0.05)  # 5.5 Lab units


def _raising_exporter(monkeypatch) -> None:
    import torch

    def export(*args, **kw):
        raise RuntimeError("Exporting the operator 'aten::grid_sampler' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", export)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(_mismatching_engine, "differs from eager"), (_raising_exporter, "the exporter failed: RuntimeError")],
    ids=["check-fails", "exporter-raises"],
)
def test_a_failed_onnx_export_still_registers_the_champion_on_torch(
    rerun: dict, workdir: Path, tmp_path: Path, monkeypatch, capsys, caplog, fault, reason
) -> None:
    from storage.tracking import Tracker

    alias = f"no-onnx-{fault.__name__.strip('_').replace('_', '-')}"
    fault(monkeypatch)
    result = pipeline(dataset="sample", preset="tiny", workdir=str(workdir), overrides=[f"register.alias={alias}"])
    monkeypatch.undo()
    assert _states(result)["register"] == "ran"
    warned = [r for r in caplog.records if r.name == "tasks.register" and "without an ONNX export" in r.getMessage()]
    assert len(warned) == 1 and reason in warned[0].getMessage()
    onnx = json.loads((Path(result["stages"]["register"]) / "manifest.json").read_text())["onnx"]
    assert onnx["attached"] is False and reason in onnx["reason"]
    tags = Tracker(workdir).client.get_model_version_by_alias("colorizer", alias).tags
    assert tags["onnx_export"] == "none" and reason in tags["onnx_reason"]
    assert result["registered"]["onnx_export"] is False
    src = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()[:64, :64]).save(src)
    model = ["--model", f"models:/colorizer@{alias}", "--workdir", str(workdir)]
    capsys.readouterr()
    assert main(["image", str(src), "--out", str(tmp_path / "o.png"), "--engine", "onnx", *model]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no ONNX export" in err[0] and reason in err[0], err
    assert main(["image", str(src), "--out", str(tmp_path / "o.png"), "--engine", "auto", *model]) == 0
    assert Image.open(tmp_path / "o.png").size == (64, 64)


def test_rest_api_serves_the_champion_and_refuses_malformed_requests(rerun: dict, workdir: Path) -> None:
    import http.client
    import urllib.request

    proc, base = serve_cli(["serve", "--workdir", str(workdir)], "/ping")
    try:
        image = data.chelsea()[:40:2, :48:2]  # 20 x 24, real colours (only L is used)

        def post(body: bytes, content_type: str | None = "application/json") -> tuple[int, bytes]:
            """POST with this Content-Type, or none at all (urllib would add a form type of its own)."""
            host, port = base.removeprefix("http://").rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            try:
                conn.putrequest("POST", "/invocations")
                if content_type is not None:
                    conn.putheader("Content-Type", content_type)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        status, body = post(json.dumps({"inputs": image[None].tolist()}).encode())
        assert status == 200, body[:500]
        out = np.asarray(json.loads(body)["predictions"], dtype=np.uint8)
        assert out.shape == (1, 20, 24, 3)
        assert (out.max(-1).astype(int) - out.min(-1)).max() > 0  # colour, not grey
        for bad in (b"not json", json.dumps({"inputs": "hello"}).encode(), json.dumps({"rows": [1]}).encode()):
            status, body = post(bad)
            assert 400 <= status < 500 and body, (bad, status)
        # no Content-Type at all: a 4xx with one line (MLflow alone answers a 500 and logs a traceback)
        status, body = post(json.dumps({"inputs": image[None].tolist()}).encode(), content_type=None)
        assert status == 415 and "Content-Type" in json.loads(body)["message"], (status, body[:300])
        # a parameter the model does not take (vividness to this regression-head model): refused, not ignored
        status, body = post(json.dumps({"inputs": image[None].tolist(), "params": {"vividness": 0.2}}).encode())
        assert status == 400 and "classification-head" in json.loads(body)["message"], (status, body[:300])
        with urllib.request.urlopen(base + "/ping", timeout=10) as resp:  # still serving after bad requests
            assert resp.status == 200
    finally:
        stop_cli(proc)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium (apt-get install chromium; .ci/run does)")
def test_web_page_in_a_real_browser(rerun: dict, workdir: Path, tmp_path: Path) -> None:
    import io
    import os
    import urllib.request

    from playwright.sync_api import sync_playwright

    from flows.app import demo_image

    photo, small = tmp_path / "coffee.png", tmp_path / "small.png"
    demo_image().save(photo)
    demo_image().resize((150, 100)).save(small)
    (tmp_path / "notes.txt").write_text("not a photo")
    proc, base = serve_cli(["app", "--workdir", str(workdir)], "/")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base)
            page.locator("#go").wait_for(timeout=60_000)  # the page has rendered
            assert "version" in page.locator("body").inner_text()  # which model runs
            page.locator("#photos input[type=file]").set_input_files([str(photo), str(small)])
            # Progress lines are transient: record every one the page shows while it works.
            page.evaluate(
                """() => { window.seen = new Set();
                new MutationObserver(() => {
                  const lines = document.body.innerText.matchAll(/colorizing \\S+ \\(\\d of \\d\\)/g);
                  for (const m of lines) window.seen.add(m[0]);
                }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""
            )
            page.locator("#go").click()
            link = page.locator("#downloads a[href]").first
            link.wait_for(timeout=120_000)
            page.locator("#downloads a[href]").nth(1).wait_for(timeout=60_000)
            seen = set(page.evaluate("() => [...window.seen]"))
            assert "colorizing coffee.png (1 of 2)" in seen, seen  # the second photo's line may be too brief to see
            assert seen <= {"colorizing coffee.png (1 of 2)", "colorizing small.png (2 of 2)"}, seen
            sides = page.locator("#slider img")
            sides.nth(1).wait_for(timeout=30_000)  # the first photo's before and after on the slider
            assert sides.count() == 2 and sides.nth(0).get_attribute("src") != sides.nth(1).get_attribute("src")
            png = urllib.request.urlopen(urllib.parse.urljoin(base, link.get_attribute("href")), timeout=60).read()
            result = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
            assert result.shape[:2] == (400, 600)  # the input's size (coffee is 600 x 400)
            assert (result.max(-1) - result.min(-1)).mean() > 1  # it has colour; the input was grey
            shot = Path(os.environ.get("COLORIZE_APP_SCREENSHOT", tmp_path / "app.png"))
            page.screenshot(path=str(shot), full_page=True)

            page.locator("#photos input[type=file]").set_input_files(str(tmp_path / "notes.txt"))
            page.locator("#go").click()
            page.get_by_text("not an image").wait_for(timeout=60_000)
            browser.close()
        assert proc.poll() is None  # the server goes on after a bad file
    finally:
        stop_cli(proc)
