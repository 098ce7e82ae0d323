"""Load and run a registered model in a process that can import only what its requirements.txt provides,
as in a fresh environment built from that file (``mlflow models serve`` with its default environment
manager, ``mlflow models build-docker``), without installing anything again.

Run by tests/test_pipeline.py as ``python limited_imports.py`` with a JSON object on stdin:
``distributions`` (the requirements' distributions and theirs, transitively), ``allowed`` (the
top-level modules those install), ``project``
(this project's package names, importable only from the model's own ``code/`` folder), ``source`` (the
checkout, which must not be imported from), ``tracking_uri`` and ``model_uri``. Prints one JSON line:
the prediction's shape and dtype, where each project module was loaded from, and the modules refused.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import json
import re
import sys
from importlib.machinery import BuiltinImporter, FrozenImporter, PathFinder
from pathlib import Path

request = json.load(sys.stdin)
ALLOWED = set(request["allowed"])
DISTRIBUTIONS = set(request["distributions"])
PROJECT = set(request["project"])
SOURCE = Path(request["source"]).resolve()
# The base interpreter's own folders (lib/python3.X, lib-dynload), never a site-packages.
STDLIB = [p for p in sys.path if p and Path(p).is_relative_to(sys.base_prefix) and "site-packages" not in Path(p).parts]
refused: set[str] = set()


def _outside_source(entry: str) -> bool:
    try:
        return entry != "" and not Path(entry).resolve().is_relative_to(SOURCE)
    except OSError:
        return False


class Requirements(importlib.abc.MetaPathFinder):
    """The only path-based finder left: a top-level module is found only in the standard library, the
    allowed distributions, or (for the project's packages) a folder outside the checkout. Anything else
    is simply not there, as in a fresh environment (``importlib.util.find_spec`` answers None, ``import``
    raises ModuleNotFoundError), so neither the editable install nor any other package of this venv can
    stand in for a missing requirement."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - the importlib protocol
        top = name.partition(".")[0]
        if path is not None or top in sys.stdlib_module_names or top in ALLOWED:
            return PathFinder.find_spec(name, path)  # a submodule (its package was vetted) or an allowed module
        spec = PathFinder.find_spec(name, STDLIB)  # the standard library's private modules (_sysconfigdata_...)
        if spec is None and top in PROJECT:
            spec = PathFinder.find_spec(name, [p for p in sys.path if _outside_source(p)])
        if spec is None:
            refused.add(top)
        return spec

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):  # noqa: ANN001, ANN201, B008
        """Installed metadata, of the allowed distributions only (``importlib.metadata.version``)."""
        for dist in PathFinder.find_distributions(context):
            if re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() in DISTRIBUTIONS:
                yield dist


# Builtin and frozen modules stay; every path-based finder (PathFinder, the editable install's) goes.
sys.meta_path[:] = [f for f in sys.meta_path if f in (BuiltinImporter, FrozenImporter)] + [Requirements()]
for mod in [m for m in sys.modules if m.partition(".")[0] in PROJECT]:
    del sys.modules[mod]  # none expected; never let a module from the checkout through

import mlflow  # noqa: E402 - only after the finder is in place
import numpy as np  # noqa: E402

mlflow.set_tracking_uri(request["tracking_uri"])
model = mlflow.pyfunc.load_model(request["model_uri"])
out = model.predict(np.random.default_rng(0).integers(0, 256, (3, 40, 72, 3), dtype=np.uint8))
loaded_from = {
    name: str(Path(mod.__file__).resolve())
    for name, mod in sys.modules.items()
    if name.partition(".")[0] in PROJECT and getattr(mod, "__file__", None)
}
print(
    json.dumps(
        {"shape": list(out.shape), "dtype": str(out.dtype), "loaded_from": loaded_from, "refused": sorted(refused)}
    )
)
