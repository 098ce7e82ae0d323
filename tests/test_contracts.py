"""The stage contract: a key that follows all the code a stage runs and every setting it reads, and the
layers that keep formats and settings where they belong."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from flows.config import PipelineConfig, build_config
from flows.dag import SPECS, STAGES
from storage import shard_runner, stage_store
from storage.code_identity import PACKAGES, code_version, imported_modules
from storage.errors import UserFacingError
from storage.settings import Section
from tasks import download, evaluate, prepare, register, train, upscale

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- code identity
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages, to edit without touching the real ones."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _append(path: Path, text: str = "\n# an edit\n") -> None:
    path.write_text(path.read_text() + text)


def _stage_keys(tree: Path) -> dict[str, str]:
    return {spec.name: code_version(spec.module, tree) for spec in SPECS}


@pytest.mark.parametrize(
    ("module", "importers"),
    [
        # prepare calls its colorfulness, train its differentiable form (the mse+colourfulness loss)
        ("model/metrics.py", {"prepare", "train", "evaluate", "register"}),
        ("model/study.py", {"evaluate"}),  # register reads what evaluate computed, not the module
        # the bins of the ab prior in prepare's manifest; the classification head (colorizer) of the others
        ("model/ab_bins.py", {"prepare", "train", "evaluate", "register"}),
        ("storage/archives.py", {"download"}),
        ("model/inference.py", {"evaluate", "register"}),  # the registered model runs it; evaluate its devices
        ("storage/stage.py", {"download", "upscale", "prepare", "train", "evaluate", "register"}),
    ],
)
def test_editing_a_module_changes_the_keys_of_exactly_the_stages_that_import_it(
    tree: Path, module: str, importers: set[str]
) -> None:
    before = _stage_keys(tree)
    _append(tree / module)
    after = _stage_keys(tree)
    assert {s for s in before if before[s] != after[s]} == importers


def test_the_import_graph_follows_lazy_and_from_imports(tree: Path) -> None:
    graph = imported_modules("tasks.register", tree)
    assert "model.pyfunc" in graph  # imported inside a function: it runs, so it counts
    assert "model.metrics" in graph and "storage.stage" in graph and "model" in graph
    assert not any(m.startswith("flows") for m in graph)
    (tree / "model" / "extra.py").write_text("X = 1\n")
    _append(tree / "model" / "samples.py", "\nfrom model import extra  # noqa\n")
    assert "model.extra" in imported_modules("tasks.train", tree)
    before = code_version("tasks.train", tree)
    _append(tree / "model" / "extra.py")
    assert code_version("tasks.train", tree) != before


# ---------------------------------------------------------------- every setting is in its stage's key
def _candidates(annotation: Any, default: Any, resources: dict[str, str]) -> Iterator[Any]:
    """Other plausible values for a field, from its type alone."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        yield not default
    elif origin is typing.Literal:
        yield from (a for a in args if a != default)
    elif annotation is int:
        yield from (default + 1, default * 2, max(default - 1, 0), default + 100)
    elif annotation is float:
        yield from (default * 2, default / 2, default + 0.05)
    elif annotation is str:
        yield from ((default or "") + "x", "https://mirror.example/data/archive.tar.gz", *resources.values())
    elif origin is dict or annotation is dict:
        yield {"endpoint_url": "http://127.0.0.1:9"}
    elif origin is list:
        (item,) = args
        yield from ([v] for v in _candidates(item, 1 if item in (int, float) else None, resources))
    elif origin is tuple:
        yield (default[0], default[1] * 0.9)
        yield (default[0] * 0.9, default[1])
    elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        if default is not None:
            yield None
        for a in inner:
            if a is str:
                yield from resources.values()
            else:
                yield from _candidates(a, default if default is not None else 1, resources)
    else:
        raise AssertionError(f"no candidate values for {annotation}")


def _plans(cfg: PipelineConfig, workdir: Path) -> dict[str, dict[str, Any]]:
    """Every stage's plan for ``cfg``, over fixed upstream manifests (content digests stay the same)."""

    def upstream(stage: str, **extra: Any) -> dict[str, Any]:
        return {"stage": stage, "key": f"{stage}-key", "content": f"{stage}-content", "folder": "/x", **extra}

    dl = upstream("download", sets={"lowres": {"train": 4}})
    prep = upstream("prepare", image_size=32, counts={"train": 4})
    trained = [upstream("train", variant=v) for v in ("concat", "max")]
    plans = {
        "download": download.plan(cfg.download, cfg.seed, workdir),
        "upscale": upscale.plan(cfg.upscale, dl, workdir),
        "prepare": prepare.plan(cfg.prepare, cfg.seed, dl, upstream("upscale"), workdir),
        "evaluate": evaluate.plan(cfg.evaluate, prep, trained, workdir),
        "register": register.plan(cfg.register, upstream("evaluate"), trained, workdir),
    }
    plans.update({f"train-{v}": train.plan(cfg.train, cfg.seed, v, prep, workdir) for v in ("concat", "max")})
    return plans


def _fields(model: type[Section], prefix: str = "") -> Iterator[tuple[str, Any, Any, bool]]:
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
            yield from _fields(info.annotation, f"{name}.")
        else:
            flow_only = name in model.flow_fields()
            yield f"{prefix}{name}", info.annotation, info.get_default(call_default_factory=True), flow_only


def test_every_setting_changes_its_own_stages_key_and_no_other(tmp_path: Path, monkeypatch) -> None:
    from model.realesrgan import resolve_weights

    offline = functools.partial(resolve_weights, allow_download=False)  # no network wait per plan
    monkeypatch.setattr(upscale, "resolve_weights", offline)

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (80, 80), (200, 30, 30)).save(photos / "red.png")
    resources = {"folder": str(photos), "weights": offline().path, "variant": "max"}
    base_cfg = build_config("demo")
    base = {stage: p["key"] for stage, p in _plans(base_cfg, tmp_path / "w").items()}
    assert {s.split("-")[0] for s in base} == set(STAGES), "_plans must plan every stage of flows/dag.py"
    uses_seed = {stage for stage, p in _plans(base_cfg, tmp_path / "w").items() if "seed" in p["facts"]}
    assert {"download", "prepare", "train-concat"} <= uses_seed

    # Fields that can change a result only beside another setting (tasks.settings.train.Settings.unused):
    # without it they stay out of every key; with it they move their own stage's.
    enabled_by = {
        "train.rebalance": {"head": "classification"},
        "train.colour_weight": {"loss": "mse+colourfulness"},
        "train.hint_lr_scale": {"hints": "local"},
    }
    enabled = {}
    for name, setting in enabled_by.items():
        data = base_cfg.model_dump()
        data["train"].update(setting)
        enabled[name] = (
            data,
            {s: p["key"] for s, p in _plans(PipelineConfig.model_validate(data), tmp_path / "w").items()},
        )

    def keys_with(name: str, value: Any, start: dict[str, Any]) -> dict[str, str]:
        data = copy.deepcopy(start)
        node = data
        for part in name.split(".")[:-1]:
            node = node[part]
        node[name.split(".")[-1]] = value
        return {s: p["key"] for s, p in _plans(PipelineConfig.model_validate(data), tmp_path / "w").items()}

    checked = []
    for name, annotation, default, flow_only in _fields(PipelineConfig):
        section = name.split(".")[0] if "." in name else None
        changed_any = False
        start, before = enabled.get(name, (base_cfg.model_dump(), base))
        for value in _candidates(annotation, default, resources):
            try:
                keys = keys_with(name, value, start)
                if name in enabled_by:
                    assert keys_with(name, value, base_cfg.model_dump()) == base, f"{name} moved a key unused"
            except (ValidationError, UserFacingError):
                continue  # not a valid value for this field
            moved = {s for s in keys if keys[s] != before[s]}
            if flow_only:
                assert not moved, f"{name} (the flow's) changed the keys of {moved}"
                changed_any = True
                continue
            owners = uses_seed if section is None else {s for s in base if s.split("-")[0] == section}
            assert moved <= owners, f"{name}={value!r} changed unrelated stages {moved - owners}"
            changed_any = changed_any or moved == owners
        assert changed_any, f"no value of {name} changed its stage's key"
        checked.append(name)
    # every field of every section was reached by introspection
    assert "train.lr" in checked and "download.path" in checked and "upscale.weights" in checked
    total = sum(len(spec.settings_class().model_fields) for spec in SPECS) + 1  # + seed
    total += len(shard_runner.Settings.model_fields)  # where shards run: in no stage's key
    total += len(stage_store.Settings.model_fields)  # where finished stages are shared: in no stage's key
    assert "store.url" in checked
    assert len(checked) == total


def test_a_stage_is_given_only_its_own_section() -> None:
    cfg = build_config("tiny")
    plan = prepare.plan(cfg.prepare, cfg.seed, {"stage": "download", "key": "k", "content": "c"}, None, Path("/w"))
    assert set(plan["config"]) == set(prepare.Settings.model_fields)
    trained = train.plan(cfg.train, 0, "max", {"stage": "prepare", "key": "k", "content": "c"}, Path("/w"))
    assert "variants" not in trained["config"] and "concurrent" not in trained["config"]
    assert trained["facts"]["variant"] == "max"


# ---------------------------------------------------------------- one owner for each name list
def test_datasets_come_from_one_registry(capsys) -> None:
    from flows.cli import build_parser, main

    allowed = set(typing.get_args(download.Settings.model_fields["dataset"].annotation))
    assert allowed == set(download.SOURCES)
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert all(name in help_text for name in download.SOURCES)
    assert main(["run", "--dataset", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in download.SOURCES)
    with pytest.raises(UserFacingError, match="dataset"):
        build_config("tiny", ["download.dataset=imagenet"])


def test_fusion_variants_metrics_and_splits_have_one_owner() -> None:
    from model import fusion
    from model.metrics import HIGHER_IS_BETTER
    from storage.shards import SPLITS

    assert build_config("demo").train.variants == list(fusion.names())
    with pytest.raises(UserFacingError, match="unknown fusion variant 'sum'; choose from concat, average, max"):
        build_config("demo", ["train.variants=concat,sum"])
    assert set(typing.get_args(register.Settings.model_fields["metric"].annotation)) == set(HIGHER_IS_BETTER)
    assert SPLITS == ("train", "val", "test")
    for path in (ROOT / "tasks").glob("*.py"):
        text = path.read_text()
        assert '("train", "val", "test")' not in text and '"concat", "average", "max"' not in text, path


# ---------------------------------------------------------------- layers
def test_import_contracts_hold() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_the_acyclic_contract_fails_on_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """`make lint` fails on a circle: the project's own contract type, run by lint-imports on a package
    whose two modules import each other (one of them inside a function, as tasks/ did), names both."""
    pkg = tmp_path / "circle"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circle import b\n\nVALUE = 1\n")
    (pkg / "b.py").write_text("def late():\n    from circle import a\n\n    return a.VALUE\n")
    (tmp_path / "lint.toml").write_text(
        '[tool.importlinter]\nroot_packages = ["circle"]\n'
        'contract_types = ["acyclic: tools.import_contracts.AcyclicContract"]\n\n'
        '[[tool.importlinter.contracts]]\nname = "no cycle"\ntype = "acyclic"\n'
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--config", str(tmp_path / "lint.toml"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode != 0, out.stdout
    assert "0 kept, 1 broken" in out.stdout and "circle.a" in out.stdout and "circle.b" in out.stdout, out.stdout


def test_the_independence_contract_lists_exactly_the_stages_of_the_dag() -> None:
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (independent,) = [c for c in contracts if c["type"] == "independence"]
    assert independent["modules"] == [spec.module for spec in SPECS]


DUMMY_STAGE = """
from pydantic import Field
from storage.settings import Section
from storage.stage import make_plan, run_stage

STAGE = "polish"


class Settings(Section):
    strength: float = Field(0.5, ge=0, le=1)


def plans(s, seed, inputs, workdir):
    return {STAGE: make_plan(workdir, STAGE, {"download": inputs["download"]}, s.for_stage(), "polish-v1")}


def run(plan, force=False):
    def work(out):
        (out / "polished.txt").write_text(str(plan["config"]["strength"]))
        return {}

    return run_stage(plan, work, force=force)
"""


def test_a_new_stage_is_one_module_and_one_entry_in_the_dag(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    """A stage module and its StageSpec (here after download, taking its manifest) are all the flow, the
    config (--set polish.strength) and the CLI need: the flow plans it from its input and runs it."""
    import importlib

    import flows.config
    from flows import dag
    from flows import pipeline as flow_module
    from flows.cli import _check_stage

    (tmp_path / "dummy_stage.py").write_text(DUMMY_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = (dag.SPECS[0], dag.StageSpec("polish", "dummy_stage", ("download",)), *dag.SPECS[1:])
    monkeypatch.setattr(dag, "SPECS", specs)
    monkeypatch.setattr(dag, "STAGES", tuple(spec.name for spec in specs))
    # The reload makes new config classes; the module's own are put back after, for the flow's signature
    # (and every later test in this process) holds them.
    saved = dict(vars(flows.config))
    try:
        config = importlib.reload(flows.config)
        assert _check_stage("polish", "--until") == "polish"
        with pytest.raises(UserFacingError, match="polish.strength"):
            config.build_config("tiny", ["polish.strength=2"])
        result = flow_module.pipeline(
            preset="tiny", workdir=str(tmp_path / "w"), until="polish", overrides=["polish.strength=0.9"]
        )
        assert [c["stage"] for c in result["calls"]] == ["download", "polish"]
        assert (Path(result["stages"]["polish"]) / "polished.txt").read_text() == "0.9"
    finally:
        monkeypatch.undo()
        vars(flows.config).clear()
        vars(flows.config).update(saved)


def test_a_new_fusion_variant_is_one_entry_in_the_table(monkeypatch) -> None:
    """A variant added to model.fusion.VARIANTS is accepted by the settings and builds and runs."""
    import torch

    from model import fusion
    from model.colorizer import Colorizer, ColorizerSpec

    monkeypatch.setitem(fusion.VARIANTS, "min", fusion.Variant(project=True, merge=lambda a, b: a.minimum(b)))
    assert build_config("tiny", ["train.variants=min,max"]).train.variants == ["min", "max"]
    net = Colorizer(ColorizerSpec(fusion="min", decoder_width=8)).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_importing_the_mlflow_model_module_does_no_work() -> None:
    code = "import mlflow.models as m; m.set_model = None; import model.pyfunc; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
