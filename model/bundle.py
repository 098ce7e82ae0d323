"""What a registered model ships: the project code its entry point imports, and the requirements of
exactly that code.

MLflow runs the registered model from its own folder (``code/`` on ``sys.path``) in whatever
environment its ``requirements.txt`` builds: ``mlflow models serve`` with the default environment
manager, ``mlflow models build-docker``, another machine. So both halves are derived from one import
graph, rooted at :data:`ENTRY_MODULE`:

- the code: only the project modules that graph reaches, copied with their packages' ``__init__``
  files (not all of ``model/`` and ``storage/``, whose other modules import webdataset, prefect, s3fs...);
- the requirements: the distributions that provide every third-party module those files import,
  pinned at the versions installed here (:func:`storage.dependencies.requirements_of`).

A new import in the served code therefore adds its distribution to the next registered model's
requirements by itself, and ``tests/test_pipeline.py`` loads the registered model in a process that
can import only what ``requirements.txt`` provides.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from storage.code_identity import ROOT, imported_modules, source_file
from storage.dependencies import requirements_of

ENTRY_MODULE = "model.pyfunc"


def code_modules() -> list[str]:
    """The project modules the registered model imports (with their parent packages)."""
    return imported_modules(ENTRY_MODULE)


def pip_requirements() -> list[str]:
    """Pinned requirements of the registered model's code, derived from its imports."""
    return requirements_of([ENTRY_MODULE])


def stage_code(dest: Path) -> list[Path]:
    """Copy :func:`code_modules` under ``dest`` keeping their package layout; returns the top-level
    package folders, as ``mlflow.pyfunc.log_model(code_paths=...)`` wants them."""
    tops = []
    for module in code_modules():
        src = source_file(module)
        target = dest / src.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        tops.append(dest / module.split(".")[0])
    return sorted(set(tops))
