"""Which installed distributions a piece of the project's code needs, derived from its import graph.

A hand-kept requirements list drifted before: the registered model's code imported ``tqdm`` (through
``model.pretrained`` -> ``storage.fetch``) while its ``requirements.txt`` did not list it, so it loaded
only inside the venv that registered it. Here the list is read off the code instead:

1. :func:`external_imports` takes the project modules a module imports, transitively (the same graph
   that keys a stage's cache, :mod:`storage.code_identity`), and keeps the top-level names that are
   neither the project's nor the standard library's;
2. :func:`distributions_for` maps each name to the distribution that installs it
   (``importlib.metadata.packages_distributions``: ``PIL`` -> ``pillow``, ``cv2`` -> ``opencv-python``);
3. :func:`pinned` pins them at the versions installed here.

:func:`closure` and :func:`provided_modules` answer the reverse question for tests: which top-level
modules does a fresh environment built from a requirements list provide (the listed distributions and
everything they require, transitively)?
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Iterable
from pathlib import Path

from storage.code_identity import ROOT, external_imports


class UndeclaredImport(RuntimeError):
    """Code imports a top-level module that no installed distribution provides."""


def _canonical(name: str) -> str:
    """PEP 503 normalized distribution name: ``Pillow`` and ``pillow``, ``opencv_python`` and
    ``opencv-python`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_for(tops: Iterable[str]) -> dict[str, str]:
    """top-level module -> the (normalized) distribution installed here that provides it.

    Raises :class:`UndeclaredImport` for a name no installed distribution provides: code that imports
    it cannot run anywhere, and a requirement cannot be derived for it."""
    known = _packages_distributions()
    out: dict[str, str] = {}
    missing = []
    for top in sorted(tops):
        dists = sorted({_canonical(d) for d in known.get(top, [])})
        if not dists:
            missing.append(top)
            continue
        out[top] = dists[0]
    if missing:
        raise UndeclaredImport(f"no installed distribution provides {', '.join(missing)}")
    return out


def pinned(dists: Iterable[str]) -> list[str]:
    """``name==version`` for each distribution, at the version installed here, sorted."""
    return [f"{d}=={importlib.metadata.version(d)}" for d in sorted(set(dists))]


def requirements_of(modules: Iterable[str], root: Path = ROOT) -> list[str]:
    """The pinned requirements of everything ``modules`` import: what a fresh environment needs to run
    that code, and nothing it does not use."""
    return pinned(distributions_for(external_imports(modules, root)).values())


def closure(requirements: Iterable[str]) -> set[str]:
    """The normalized names of ``requirements`` (``name==version`` or plain names) and every
    distribution they require, transitively, as installed here (environment markers evaluated, extras
    not taken): what pip would install into a fresh environment from that list."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r).name for r in requirements]
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # required but not installed here: provides nothing to import
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def provided_modules(dists: Iterable[str]) -> set[str]:
    """Top-level module names that the distributions ``dists`` (normalized names) install."""
    wanted = {_canonical(d) for d in dists}
    return {top for top, owners in _packages_distributions().items() if wanted & {_canonical(o) for o in owners}}
