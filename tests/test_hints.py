"""Hints (model.hints, the colorizer's hint inputs): parsing and checking what a user gives, encoding it
onto the network's grid, the simulated user, and a model without hints being exactly the one from before
hints existed."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHROMIUM, serve_cli, stop_cli

from model import hints
from model.colorizer import Colorizer, ColorizerSpec

DIGESTS = json.loads((Path(__file__).parent / "data" / "colorizer_digests.json").read_text())


def _state_digest(net: Colorizer) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        if k == "bins":  # computed from float Lab conversions, not something hints touch
            continue
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _graph_digest(net: Colorizer) -> str:
    import onnx

    from model.onnx_engine import write_onnx

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        write_onnx(net, path)
        g = onnx.load(str(path)).graph
    desc: list = [[n.op_type, list(n.input), list(n.output)] for n in g.node]
    desc.append(
        [[i.name for i in g.input], [o.name for o in g.output], sorted((t.name, list(t.dims)) for t in g.initializer)]
    )
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()


def _spec(head: str = "regression", fusion: str = "concat", mode: str = "off") -> ColorizerSpec:
    classes = 261 if head == "classification" else 0
    return ColorizerSpec(fusion=fusion, decoder_width=8, image_size=32, head=head, classes=classes, hints=mode)


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_a_model_without_hints_is_the_model_from_before_hints_existed(name: str) -> None:
    """Same seed, same state dict (keys, shapes, values) and same ONNX graph as a network built before
    hints were added (tests/data/colorizer_digests.json): so the same outputs, and old models load as before."""
    head, fusion = name.split("-")
    torch.manual_seed(0)
    net = Colorizer(_spec(head, fusion)).eval()
    assert _state_digest(net) == DIGESTS[name]["state"]
    assert _graph_digest(net) == DIGESTS[name]["graph"]
    assert "hints" not in net.spec.as_dict()  # model.json as before
    with pytest.raises(hints.HintError, match="trained without hints"):
        net(torch.rand(1, 1, 32, 32), hint_ab=torch.zeros(1, 2, 32, 32), hint_mask=torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("head", ["regression", "classification"])
@pytest.mark.parametrize("fusion", ["concat", "average", "max"])
def test_a_new_hinted_model_starts_as_the_automatic_one_and_a_point_reaches_its_region(head: str, fusion: str) -> None:
    """Zero-initialised hint layers: at the start, hints change nothing (training starts from the
    automatic colorizer). Once they have weights, one hinted pixel moves the colour far from itself."""
    torch.manual_seed(0)
    plain = Colorizer(_spec(head, fusion)).eval()
    torch.manual_seed(0)
    hinted = Colorizer(_spec(head, fusion, "local+global")).eval()
    x = torch.rand(1, 1, 32, 32)
    ab, mask = torch.zeros(1, 2, 32, 32), torch.zeros(1, 1, 32, 32)
    ab[0, :, 16, 16], mask[0, 0, 16, 16] = torch.tensor([0.5, -0.4]), 1.0
    with torch.no_grad():
        assert torch.equal(plain(x), hinted(x, hint_ab=ab, hint_mask=mask))
        for p in [*hinted.hint_local.parameters(), *hinted.hint_global.parameters()]:
            p.normal_(0, 0.5)
        moved = (hinted(x, hint_ab=ab, hint_mask=mask) - hinted(x)).abs().sum(1)[0]
    assert (moved > 0).float().mean() > 0.9, "one point should reach (almost) all of a 32 px image"


def test_points_parse_and_round_trip_through_the_json_the_page_exports() -> None:
    p = hints.parse_point("12,7.5:#3366CC")
    assert (p.x, p.y, p.color) == (12.0, 7.5, "#3366cc")
    a, b = p.ab()
    assert a > 0 > b  # a blue: b well below 0
    assert hints.parse_json(hints.to_json([p, hints.Point(0, 0, "#ff0000")])) == [p, hints.Point(0, 0, "#ff0000")]
    assert hints.parse_json('[{"x": 1, "y": 2, "color": "#000000"}]') == [hints.Point(1, 2, "#000000")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("12,7", "expected X,Y:#RRGGBB"),
        ("12,7:#12345", "expected X,Y:#RRGGBB"),
        ("12,7:red", "expected X,Y:#RRGGBB"),
        ("nan,7:#123456", "expected X,Y:#RRGGBB"),
    ],
)
def test_a_malformed_point_is_one_line(text: str, message: str) -> None:
    with pytest.raises(hints.HintError, match=message):
        hints.parse_point(text)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{bad", "not valid JSON"),
        ('{"points": 3}', "expected"),
        ('{"points": [{"x": 1, "y": 2}]}', "point 0 must be"),
        ('{"points": [{"x": "a", "y": 2, "color": "#000000"}]}', "numbers"),
        ('{"points": [{"x": true, "y": 2, "color": "#000000"}]}', "finite numbers"),
        ('{"points": [{"x": 1e999, "y": 2, "color": "#000000"}]}', "finite numbers"),
        ('{"points": [{"x": 1, "y": 2, "color": "#00000g"}]}', "not #RRGGBB"),
        (json.dumps({"points": [{"x": 1, "y": 1, "color": "#000000"}] * 300}), "more than 256 points"),
        ("[" + " " * (1 << 20) + "]", "larger than"),
    ],
)
def test_a_malformed_hints_document_is_one_line(doc: str, message: str) -> None:
    with pytest.raises(hints.HintError, match=message):
        hints.parse_json(doc)


def test_a_point_lands_where_the_user_put_it_and_outside_the_photo_is_refused() -> None:
    ab, mask = hints.local_maps([hints.Point(150, 10, "#0000ff")], width=200, height=100, size=32)
    assert mask.sum() == 1 and mask[0, 0, 3, 24] == 1  # (150/200*32, 10/100*32)
    assert ab[0, 1, 3, 24] < -0.5 and ab[0, :, 0, 0].abs().sum() == 0  # blue's b there, nothing elsewhere
    with pytest.raises(hints.HintError, match="outside the 200x100 photo"):
        hints.local_maps([hints.Point(200, 10, "#0000ff")], width=200, height=100, size=32)


def test_a_grey_reference_is_refused_and_a_colour_one_gives_its_palette() -> None:
    with pytest.raises(hints.HintError, match="grey"):
        hints.reference_hint(np.full((20, 20, 3), 128, np.uint8))
    red = np.zeros((20, 20, 3), np.uint8)
    red[..., 0] = 200
    g = hints.reference_hint(red)
    assert g.shape == (1, hints.global_size()) and g[0, -1] == 1
    assert torch.isclose(g[0, :-2].sum(), torch.tensor(1.0)) and g[0, -2] > 0.5  # a saturated palette


def test_the_simulated_user_is_reproducible_and_gives_a_share_of_images_no_point() -> None:
    truth = torch.rand(512, 2, 32, 32) - 0.5
    one = hints.simulate(truth, "local+global", torch.Generator().manual_seed(3))
    two = hints.simulate(truth, "local+global", torch.Generator().manual_seed(3))
    assert all(torch.equal(one[k], two[k]) for k in one)
    empty = (one["hint_mask"].flatten(1).sum(1) == 0).float().mean()
    assert 0.07 < empty < 0.2  # Geometric(1/8) - 1: one image in eight has none
    given = (one["global_hint"][:, -1] == 1).float().mean()
    assert 0.4 < given < 0.6
    where = one["hint_mask"].bool().expand_as(one["hint_ab"])
    assert one["hint_ab"][where].abs().max() <= truth.abs().max()  # means of the truth over patches


def test_evaluation_points_are_the_same_for_every_model_and_count_as_asked() -> None:
    truth = torch.rand(4, 2, 64, 64) - 0.5
    a, b = hints.evaluation_points(truth, 10, seed=0), hints.evaluation_points(truth, 10, seed=0)
    assert torch.equal(a["hint_mask"], b["hint_mask"])
    assert (a["hint_mask"].flatten(1).sum(1) <= 10 * 4).all() and (a["hint_mask"].flatten(1).sum(1) > 0).all()


def test_an_images_evaluation_points_do_not_depend_on_its_batch() -> None:
    """The hint curve's points on image i come from (seed, i): scored in batches of 4 or of 1, every model
    sees the same points, and another seed moves them."""
    truth = torch.rand(4, 2, 32, 32) - 0.5
    whole = hints.evaluation_points(truth, 5, seed=0, first_index=10)
    for i in range(4):
        one = hints.evaluation_points(truth[i : i + 1], 5, seed=0, first_index=10 + i)
        assert torch.equal(one["hint_mask"][0], whole["hint_mask"][i])
        assert torch.equal(one["hint_ab"][0], whole["hint_ab"][i])
    assert not torch.equal(hints.evaluation_points(truth, 5, seed=1, first_index=10)["hint_mask"], whole["hint_mask"])
    glob = hints.curve_inputs(truth, hints.GLOBAL, 0, 0)
    assert set(glob) == {"global_hint"} and torch.equal(glob["global_hint"][:, -1], torch.ones(4))


def test_the_hint_curve_compares_every_condition_with_the_automatic_output() -> None:
    """Plain values, no MLflow: each (variant, condition) row is the mean over seeds with a paired interval
    against 0 points; each model's means become ``test_<metric>_hints_<condition>``."""
    from tasks.evaluate import Scored
    from tasks.evaluate_hints import CURVE_METRICS, hint_curve

    rng = np.random.default_rng(0)

    def scored(mse: float) -> Scored:
        nan = float("nan")  # LPIPS without its backbone
        rows = [{m: nan if m == "lpips" else mse + rng.normal(0, 1e-4) for m in CURVE_METRICS} for _ in range(20)]
        return Scored({m: float(np.mean([r[m] for r in rows])) for m in CURVE_METRICS}, rows)

    scores = {("max", s): {0: scored(0.02), 5: scored(0.012), hints.GLOBAL: scored(0.02)} for s in (0, 1)}
    curve = hint_curve(scores, "no backbone")
    rows = {(r["variant"], r["condition"]): r for r in curve.rows}
    assert set(rows) == {("max", "0"), ("max", "5"), ("max", "global")}
    five = rows[("max", "5")]
    assert five["n_seeds"] == 2 and five["rgb_mse_high"] < 0 and five["rgb_mse_better"]  # 5 points: lower error
    assert rows[("max", "global")]["rgb_mse_low"] < 0 < rows[("max", "global")]["rgb_mse_high"]  # no change
    assert "rgb_mse_diff" not in rows[("max", "0")] and "lpips_diff" not in five  # nothing to compare, or NaN
    (model, logged), _ = curve.test_metrics()
    assert model == ("max", 0) and logged["test_rgb_mse_hints_5"] == scores[("max", 0)][5].means["rgb_mse"]
    assert "test_lpips_hints_5" not in logged  # missing metrics are not logged as NaN
    md = curve.markdown()
    assert "5 points" in md and "none (automatic)" in md and "LPIPS missing: no backbone" in md


@pytest.mark.parametrize("head", ["regression", "classification"])
def test_the_onnx_export_of_a_hinted_model_takes_the_hints_as_eager_does(
    hinted_dir: Path, tmp_path: Path, head: str
) -> None:
    """The export has the hint inputs and passes the parity check with hints given (ten points of the
    check photos' own colours and their palette) as well as without; missing inputs mean "not given"."""
    from model.onnx_engine import OnnxColorizer, export

    torch.manual_seed(0)
    net = Colorizer(_spec(head, "max", "local+global")).eval()
    with torch.no_grad():
        for p in [*net.hint_local.parameters(), *net.hint_global.parameters()]:
            p.normal_(0, 0.5)
    report = export(net, tmp_path / "m.onnx")
    hinted = [k for k in report if k.startswith("max_ab_diff_") and k.endswith("_hints")]
    assert len(hinted) == (6 if head == "classification" else 3) and report["max_rgb_diff"] <= 1
    engine = OnnxColorizer(tmp_path / "m.onnx", net.spec)
    assert engine.hint_inputs == ("hint_ab", "hint_mask", "global_hint")
    x = torch.rand(1, 1, 32, 32)
    given = hints.evaluation_points(torch.rand(1, 2, 32, 32) - 0.5, 5, seed=0)
    with torch.inference_mode():
        assert not torch.allclose(engine(x, **given), engine(x), atol=1e-4)  # the points reach the graph
        assert torch.allclose(engine(x), net(x).float(), atol=2e-3)


# ---------------------------------------------------------------- colorize image --hint/--hints/--reference
@pytest.fixture(scope="module")
def hinted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hinted (local+global) colorizer whose hint layers have weights (a trained one's are learned;
    zero-initialised, an untrained one's would ignore every hint), saved as a stage folder."""
    from model.colorizer import save_trained

    torch.manual_seed(0)
    net = Colorizer(_spec("regression", "max", "local+global")).eval()
    with torch.no_grad():
        for p in net.hint_local.parameters():
            p.normal_(0, 0.5)
        for p in net.hint_global.parameters():
            p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("hinted")
    save_trained(net, folder)
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "grey.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)).convert("RGB").save(path)
    return path


def _image(photo: Path, model: Path, out: Path, *extra: str) -> np.ndarray:
    from PIL import Image

    from flows.cli import main

    assert main(["image", str(photo), "--out", str(out), "--model", str(model), *extra]) == 0
    return np.asarray(Image.open(out)).astype(int)


def test_a_hint_and_a_reference_change_the_colour_and_the_photo_keeps_its_lightness(
    photo: Path, hinted_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from model.lab import rgb8_to_lab

    plain = _image(photo, hinted_dir, tmp_path / "plain.png")
    hinted = _image(photo, hinted_dir, tmp_path / "hinted.png", "--hint", "10,12:#ff2020", "--hint", "50,40:#2040ff")
    assert np.abs(hinted - plain).max() > 2, "the points changed nothing"
    # the same points from a hints file (the page's export) give the same picture
    (tmp_path / "h.json").write_text(hints.to_json([hints.Point(10, 12, "#ff2020"), hints.Point(50, 40, "#2040ff")]))
    assert np.array_equal(_image(photo, hinted_dir, tmp_path / "file.png", "--hints", str(tmp_path / "h.json")), hinted)
    reference = tmp_path / "palette.png"
    Image.fromarray(np.full((32, 32, 3), (30, 160, 40), dtype=np.uint8)).save(reference)
    # An untrained decoder passes the bottleneck on only faintly (a change of ~1e-4 ab here), so what this
    # checks is the path: the reference is read, encoded and taken (its effect on a trained model is in
    # docs/hints.md); a model trained with local hints only refuses it, below.
    _image(photo, hinted_dir, tmp_path / "ref.png", "--reference", str(reference), "--hint", "10,12:#ff2020")

    def lightness(img: np.ndarray) -> torch.Tensor:
        return rgb8_to_lab(torch.from_numpy(img.astype(np.uint8)).permute(2, 0, 1))[0]

    source = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    inside = torch.from_numpy(((hinted > 0) & (hinted < 255)).all(-1))  # pixels the sRGB gamut did not clip
    assert (lightness(hinted) - lightness(source)).abs()[inside].max() < 1.0  # only a/b moved (L within rounding)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--hint", "10,10:red"], "expected X,Y:#RRGGBB"),
        (["--hint", "500,10:#ff0000"], "outside the 64x48 photo"),
        (["--hints", "/nonexistent/h.json"], "--hints /nonexistent/h.json"),
        (["--reference", "GREY"], "the reference is grey"),
        (["--hint", "1,1:#ff0000", "--engine", "onnx"], "no ONNX export"),
    ],
)
def test_a_bad_hint_is_one_line_and_exit_2(
    photo: Path, hinted_dir: Path, tmp_path: Path, extra: list[str], said: str, capsys
) -> None:
    from PIL import Image

    from flows.cli import main

    grey = tmp_path / "grey-ref.png"
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(grey)
    extra = [str(grey) if a == "GREY" else a for a in extra]
    out = tmp_path / "out.png"
    assert main(["image", str(photo), "--out", str(out), "--model", str(hinted_dir), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not out.exists()


def test_a_model_trained_without_hints_or_without_a_reference_refuses_them_in_one_line(
    photo: Path, model_dir: Path, tmp_path: Path, capsys
) -> None:
    from PIL import Image

    from flows.cli import main
    from model.colorizer import save_trained

    out = tmp_path / "out.png"
    assert main(["image", str(photo), "--out", str(out), "--model", str(model_dir), "--hint", "1,1:#ff0000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained without hints" in err[0] and "train.hints=local" in err[0], err
    local_only = tmp_path / "local"
    torch.manual_seed(0)
    save_trained(Colorizer(_spec("regression", "max", "local")).eval(), local_only)
    reference = tmp_path / "palette.png"
    Image.fromarray(np.full((32, 32, 3), (30, 160, 40), dtype=np.uint8)).save(reference)
    assert (
        main(["image", str(photo), "--out", str(out), "--model", str(local_only), "--reference", str(reference)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without a reference" in err[0] and "local+global" in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------- a hinted run, end to end
def test_a_hinted_run_trains_scores_the_hint_curve_registers_and_takes_hints(
    tiny_prepared: Path, tmp_path: Path, photo: Path
) -> None:
    """train.hints=local+global on the tiny data: the evaluation scores every point count and the global
    hint against the same model's automatic output, logs them to the model's MLflow run and the run page,
    and the registered version says it takes hints and takes them from the CLI."""
    import asyncio
    from uuid import UUID

    import pandas as pd
    from PIL import Image
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.cli import main
    from flows.pipeline import pipeline
    from flows.run_page import HINT_CURVE_KEY
    from storage.tracking import Tracker
    from tests.conftest import copy_prepared

    workdir = copy_prepared(tiny_prepared, tmp_path / "w")
    sets = ["train.hints=local+global", "train.variants=max"]
    result = pipeline(dataset="sample", preset="tiny", workdir=str(workdir), overrides=sets)
    folder = Path(result["stages"]["evaluate"])
    curve = pd.read_csv(folder / "hints.csv", dtype={"condition": str})
    assert list(curve["condition"]) == ["0", "1", "2", "5", "10", "20", "50", "global"]
    automatic = pd.read_csv(folder / "metrics.csv").set_index("variant").loc["max"]
    zero = curve.set_index("condition").loc["0"]
    assert zero["psnr"] == automatic["psnr"] and zero["rgb_mse"] == automatic["rgb_mse"]  # 0 points: the same row
    assert curve.loc[curve["condition"] != "0", "psnr_low"].notna().all()  # an interval against 0 points each
    assert (folder / "hints.png").stat().st_size > 0 and "global (the truth's)" in (folder / "hints.md").read_text()
    picture = Image.open(folder / "hints_grid.png")  # grey | automatic | 5 | 10 | global | truth, 4 images
    assert picture.size == (6 * 32 * 2, 4 * 32 * 2)

    tracker = Tracker(workdir)
    trained = json.loads((Path(result["stages"]["train-max"]) / "manifest.json").read_text())
    run = tracker.client.get_run(trained["mlflow_run_id"])
    assert {"test_psnr_hints_10", "test_rgb_mse_hints_50", "test_colorfulness_gap_hints_global"} <= set(
        run.data.metrics
    )
    assert run.data.metrics["test_psnr_hints_0"] == automatic["psnr"]
    parent = {a.path for a in tracker.client.list_artifacts(result["mlflow_parent_run_id"], "evaluation")}
    assert {"evaluation/hints.png", "evaluation/hints.md", "evaluation/hints_grid.png"} <= parent

    async def artifacts() -> list:
        async with get_client() as client:
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(result["flow_run_id"])]))
            return await client.read_artifacts(flow_run_filter=runs, limit=200)

    page = {a.key: a.data for a in asyncio.run(artifacts()) if a.key}
    assert "data:image/png;base64," in page[HINT_CURVE_KEY] and "10 points" in page[HINT_CURVE_KEY]

    reg = result["registered"]
    version = tracker.client.get_model_version(reg["model_name"], reg["version"])
    assert "Takes colour points and a reference photo" in version.description
    assert version.tags["hints"] == "local+global"
    out = tmp_path / "hinted.png"
    argv = ["image", str(photo), "--out", str(out), "--workdir", str(workdir), "--hint", "10,12:#2040ff"]
    assert main(argv) == 0 and out.exists()

    # the pyfunc (what `colorize serve` answers REST requests with) takes them as documented parameters
    import base64
    import io

    import mlflow
    from mlflow.exceptions import MlflowException

    from storage.tracking import use_store

    use_store(workdir)
    served = mlflow.pyfunc.load_model(f"models:/{reg['model_name']}/{reg['version']}")
    assert {p.name for p in served.metadata.get_params_schema().params} == {"hints", "reference"}
    image = np.asarray(Image.open(photo).convert("RGB"))[None]
    palette = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), (30, 160, 40), dtype=np.uint8)).save(palette, format="PNG")
    given = {
        "hints": hints.to_json([hints.Point(10, 12, "#2040ff")]),
        "reference": base64.b64encode(palette.getvalue()).decode(),
    }
    answer = served.predict(image, params=given)
    assert answer.shape == image.shape and answer.dtype == np.uint8
    for bad, said in (
        ({"hints": hints.to_json([hints.Point(500, 1, "#2040ff")])}, "outside the 64x48 photo"),
        ({"reference": "not base64!"}, "not base64"),
        ({"hints": '{"points": [{"x": 1}]}'}, "point 0 must be"),
    ):
        with pytest.raises(MlflowException, match=said):
            served.predict(image, params=bad)


# ---------------------------------------------------------------- the page
def test_the_pages_recolouring_takes_points_and_a_reference_and_says_what_is_wrong(
    photo: Path, hinted_dir: Path, tmp_path: Path
) -> None:
    from flows.app import hint_modes, marked, recolour
    from flows.colorize_images import PhotoColorizer

    colorizer = PhotoColorizer.load(str(hinted_dir), tmp_path)
    assert hint_modes(colorizer) == (True, True)
    plain, _, _ = recolour(colorizer, str(photo), [], None, False, tmp_path)
    point = {"x": 10, "y": 12, "color": "#2040ff"}
    hinted, files, line = recolour(colorizer, str(photo), [point], None, False, tmp_path)
    assert line == "Hints: 1 point." and np.abs(hinted.astype(int) - plain.astype(int)).max() > 2
    assert [Path(f).suffix for f in files] == [".png", ".json"] and hints.parse_json(Path(files[1]).read_text())
    palette = np.full((16, 16, 3), (30, 160, 40), dtype=np.uint8)
    assert recolour(colorizer, str(photo), [point], palette, False, tmp_path)[2].endswith("the reference's palette.")
    for bad, said in (
        (([{**point, "x": 500}], None), "outside the 64x48 photo"),
        (([point], np.full((16, 16, 3), 128, dtype=np.uint8)), "the reference is grey"),
    ):
        picture, files, line = recolour(colorizer, str(photo), *bad, False, tmp_path)
        assert picture is None and files is None and said in line
    assert recolour(colorizer, None, [point], None, False, tmp_path)[2].startswith("Colorize a photo first")
    ring = marked(np.zeros((48, 64, 3), dtype=np.uint8), [point])
    assert tuple(ring[12, 10]) == (0x20, 0x40, 0xFF)  # the point drawn in its colour where it is


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium (apt-get install chromium; .ci/run does)")
def test_the_page_places_a_point_by_a_click_and_recolours(hinted_dir: Path, tmp_path: Path) -> None:
    """In chromium: a click on the photo places a point and the hinted picture differs from the automatic
    one; remove and reference work; the downloads are the hinted PNG and a hints JSON that reads back; a
    grey reference is a line in the panel and the server goes on."""
    import io
    import os
    import urllib.parse
    import urllib.request

    from PIL import Image
    from playwright.sync_api import sync_playwright

    from flows.app import demo_image

    photo, palette, grey = tmp_path / "coffee.png", tmp_path / "palette.png", tmp_path / "grey.png"
    demo_image().resize((240, 160)).save(photo)
    Image.fromarray(np.full((32, 32, 3), (30, 160, 40), dtype=np.uint8)).save(palette)
    Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)).save(grey)
    proc, base = serve_cli(["app", "--model", str(hinted_dir)], "/")

    def fetch(link) -> bytes:  # noqa: ANN001 - a Playwright locator
        return urllib.request.urlopen(urllib.parse.urljoin(base, link.get_attribute("href")), timeout=60).read()

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(base)
            page.locator("#go").wait_for(timeout=60_000)
            page.locator("#photos input[type=file]").set_input_files(str(photo))
            page.locator("#go").click()
            automatic = page.locator("#downloads a[href]").first
            automatic.wait_for(timeout=120_000)
            target = page.locator("#hint-photo img")
            target.wait_for(timeout=60_000)
            box = target.bounding_box()
            target.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.4})
            status = page.locator("#hint-status")
            status.get_by_text("1 point.").wait_for(timeout=60_000)
            hinted_png = page.locator("#hint-downloads a[href]").first
            hinted_png.wait_for(timeout=60_000)
            plain = np.asarray(Image.open(io.BytesIO(fetch(automatic))).convert("RGB")).astype(int)
            hinted = np.asarray(Image.open(io.BytesIO(fetch(hinted_png))).convert("RGB")).astype(int)
            assert hinted.shape == plain.shape == (160, 240, 3)
            assert np.abs(hinted - plain).max() > 2, "the clicked point changed nothing"
            target.click(position={"x": box["width"] * 0.7, "y": box["height"] * 0.6})
            status.get_by_text("2 points.").wait_for(timeout=60_000)
            page.locator("#undo").click()
            status.get_by_text("1 point.").wait_for(timeout=60_000)
            doc = page.locator("#hint-downloads a[href]").nth(1)
            (point,) = hints.parse_json(fetch(doc))
            assert 0.2 * 240 < point.x < 0.4 * 240 and 0.3 * 160 < point.y < 0.5 * 160 and point.color == "#3366cc"
            page.locator("#reference input[type=file]").set_input_files(str(palette))
            status.get_by_text("1 point and the reference's palette.").wait_for(timeout=60_000)
            shot = Path(os.environ.get("COLORIZE_APP_HINTS_SCREENSHOT", tmp_path / "hints.png"))
            page.screenshot(path=str(shot), full_page=True)
            page.locator("#reference input[type=file]").set_input_files(str(grey))
            status.get_by_text("the reference is grey").wait_for(timeout=60_000)
            browser.close()
        assert proc.poll() is None  # the server goes on after a bad hint
    finally:
        stop_cli(proc)


def test_an_export_without_hint_inputs_gives_torch_under_auto_and_one_line_under_onnx(tmp_path: Path) -> None:
    """A hinted version whose ONNX export predates the hint inputs: hints run on torch under ``auto``;
    ``--engine onnx`` says why not; without hints the export is used as before."""
    from model.onnx_engine import OnnxColorizer, write_onnx
    from model.pyfunc import ColorizerModel, EngineError

    torch.manual_seed(0)
    hinted = Colorizer(_spec("regression", "max", "local+global")).eval()
    write_onnx(Colorizer(_spec("regression", "max")).eval(), tmp_path / "old.onnx")  # no hint inputs
    served = ColorizerModel()
    served.spec, served.net, served.onnx_path, served.no_onnx_reason = hinted.spec, hinted, tmp_path / "old.onnx", None
    served._onnx = None
    assert isinstance(served.engine("auto"), OnnxColorizer)
    assert served.engine("auto", hinted=True) is hinted
    with pytest.raises(EngineError, match="no hint inputs"):
        served.engine("onnx", hinted=True)
