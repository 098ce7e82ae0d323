"""A stage's code identity, computed from the import graph instead of a hand-kept module list.

The identity of a module is the hash of its own source and of every project module it imports,
transitively (``import x.y``, ``from x import y``, relative imports, and imports inside functions,
which run too). Package ``__init__`` files count, since importing a submodule runs them. Modules
outside the project (torch, the standard library) are left to the recorded library versions.

A hand-kept list drifted before (editing ``model/metrics.py`` left the prepare stage cached); a graph
read from the source cannot.

Import statements are read with a regular expression over the source lines, not ``ast.parse``: plans
are computed inside Prefect flows, and CPython 3.11's AST constructor is not safe when two threads
parse at once ("AST constructor recursion depth mismatch", python/cpython#106905). A line inside a
string that looks like an import can only add a module to the graph: the key then covers a little more
code than it needs, never less.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "model", "storage")


def source_file(module: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    stat = path.stat()
    return _parsed_imports(path, module, stat.st_mtime_ns, stat.st_size)


_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.MULTILINE)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n]+)", re.MULTILINE)


def _names(clause: str) -> list[str]:
    """``a.b as c, d  # comment`` or ``(x,\n y as z,)`` -> ["a.b", "d"] / ["x", "y"]."""
    text = re.sub(r"#[^\n]*", "", clause).strip().strip("()")
    return [item.split()[0] for item in text.replace("\n", " ").split(",") if item.split()]


@functools.lru_cache(maxsize=1024)
def _parsed_imports(path: Path, module: str, _mtime_ns: int, _size: int) -> frozenset[str]:
    """Every module name ``path`` may import, including ``from pkg import sub`` submodules (read once
    per version of the file: the stat is part of the cache key)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    source = path.read_text()
    found: set[str] = set()
    for clause in _IMPORT.findall(source):
        found.update(_names(clause))
    for dots, name, clause in _FROM.findall(source):
        if dots:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - len(dots) + 1])
            target = f"{base}.{name}" if name else base
        else:
            target = name
        found.add(target)
        found.update(f"{target}.{item}" for item in _names(clause))
    return frozenset(found)


def imported_modules(module: str, root: Path = ROOT) -> list[str]:
    """``module`` and the project modules it imports, transitively, with their parent packages."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in PACKAGES:
            continue
        path = source_file(name, root)
        if path is None:  # ``from pkg import function``: not a module
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend(parents)
        todo.extend(_imports(path, name))
    return sorted(seen)


def code_version(module: str, root: Path = ROOT) -> str:
    """Hash of the sources of ``module`` and everything it imports from the project."""
    h = hashlib.sha256()
    for name in imported_modules(module, root):
        h.update(name.encode() + b"\0")
        h.update(source_file(name, root).read_bytes())
    return h.hexdigest()[:16]


def external_imports(modules: Iterable[str], root: Path = ROOT) -> set[str]:
    """Top-level names of the third-party modules that ``modules`` import, transitively through the
    project's own modules (imports inside functions included: they run too)."""
    found: set[str] = set()
    for module in {m for start in modules for m in imported_modules(start, root)}:
        for name in _imports(source_file(module, root), module):
            top = name.split(".")[0]
            if top and top not in PACKAGES and top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found
