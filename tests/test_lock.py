"""requirements.lock is what `make setup` installs: it must agree with pyproject.toml, pin every package
with its hashes, and be what this environment holds. When it fails: `make lock`, then `make setup`."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from storage.code_identity import ROOT

PROJECT = "colorize-pipeline (pyproject.toml)"


def _lock() -> dict[str, tuple[Version, int, set[str]]]:
    """name -> (pinned version, number of hashes, what the lock says requires it)."""
    entries: dict[str, tuple[Version, int, set[str]]] = {}
    name = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line):
            name = canonicalize_name(m[1])
            entries[name] = (Version(m[2]), 0, set())
        elif line.strip().startswith("--hash=sha256:"):
            v, n, via = entries[name]
            entries[name] = (v, n + 1, via)
        elif (m := re.match(r"^\s+#\s+(?:via\s+)?([^\s#].*)$", line)) and name and m[1] != "via":
            entries[name][2].add(m[1].strip())
    return entries


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_declared_requirement_is_locked_at_a_version_it_allows() -> None:
    lock = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is in pyproject.toml but not in requirements.lock: run make lock"
        assert req.specifier.contains(lock[name][0], prereleases=True), (
            f"requirements.lock has {name}=={lock[name][0]}, pyproject.toml asks {req}: run make lock"
        )


def test_the_lock_holds_nothing_pyproject_no_longer_asks_for() -> None:
    lock = _lock()
    direct = {name for name, (_, _, via) in lock.items() if PROJECT in via}
    assert direct == {canonicalize_name(r.name) for r in _declared()}, "pyproject.toml changed: run make lock"
    orphans = {name for name, (_, _, via) in lock.items() if not via}
    assert not orphans, f"locked but required by nothing: {sorted(orphans)}"


def test_every_locked_package_carries_hashes() -> None:
    assert all(n > 0 for _, n, _ in _lock().values())
    assert len(_lock()) > 100  # the parse found the file's entries


def test_this_environment_holds_the_locked_versions() -> None:
    """`make setup` installs from the lock; a venv that drifted from it is not the one CI tests."""
    drift = {}
    for name, (version, _, _) in _lock().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            drift[name] = "missing"
            continue
        if installed != version:
            drift[name] = f"{installed} installed, {version} locked"
    assert not drift, f"run make setup: {drift}"
