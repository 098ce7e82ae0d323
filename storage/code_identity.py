"""A stage's code identity, computed from the import graph instead of a hand-kept module list.

The identity of a module is the hash of its own source and of every project module it imports,
transitively (``import x.y``, ``from x import y``, relative imports, and imports inside functions,
which run too). Package ``__init__`` files count, since importing a submodule runs them. Modules
outside the project (torch, the standard library) are left to the recorded library versions.

A hand-kept list drifted before (editing ``model/metrics.py`` left the prepare stage cached); a graph
read from the source cannot.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "model", "storage")


def _source_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    stat = path.stat()
    return _parsed_imports(path, module, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _parsed_imports(path: Path, module: str, _mtime_ns: int, _size: int) -> frozenset[str]:
    """Every module name ``path`` may import, including ``from pkg import sub`` submodules (parsed once
    per version of the file: the stat is part of the cache key)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return frozenset(found)


def imported_modules(module: str, root: Path = ROOT) -> list[str]:
    """``module`` and the project modules it imports, transitively, with their parent packages."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in PACKAGES:
            continue
        path = _source_file(name, root)
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
        h.update(_source_file(name, root).read_bytes())
    return h.hexdigest()[:16]
