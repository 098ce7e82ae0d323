"""Stage folders keyed by their inputs, config and code; ``manifest.json`` written last as proof of completion.

Layout under the work dir::

    <stage>/<key>/            finished output; manifest.json lists every file with sha256 and size
    <stage>/<key>.partial/    work in progress, kept across crashes so a stage can resume (shards, checkpoints)
    <stage>/<key>.lock        flock held while a process works on that key: two runs never write one folder
    <stage>/last.json         the last state of the stage in this work dir (for ``colorize status``)

A stage is done only if its manifest exists, its self-checksum matches and every listed file has the
recorded size and sha256. Anything else is redone, never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from storage.atomic import TMP_MARK, fsync_dir, is_temp, temp_name, write_json
from storage.errors import UserFacingError
from storage.redact import redact_config, redact_obj

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCRATCH = "scratch"  # resumable state inside a .partial folder; dropped when the stage finishes
_VERSIONED = ("torch", "torchvision", "numpy", "pillow", "webdataset", "prefect", "mlflow", "scikit-image")


class StageError(UserFacingError):
    """A stage could not run or its stored output is unusable; the message is meant for the user."""


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def input_ref(manifest: Mapping[str, Any]) -> dict[str, str]:
    """What a downstream key depends on: the upstream stage, key and the digest of its file contents."""
    if set(manifest) == {"stage", "key", "content"}:
        return dict(manifest)
    return {"stage": manifest["stage"], "key": manifest["key"], "content": manifest["content"]}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.as_posix() != MANIFEST and not is_temp(p) and rel.parts[0] != SCRATCH:
            files[rel.as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return files


def _self_digest(manifest: Mapping[str, Any]) -> str:
    return digest({k: v for k, v in manifest.items() if k != "manifest_sha256"})


def self_checks(manifest: Any) -> bool:
    """The manifest is a dict whose recorded checksum matches its content (not edited, not corrupted)."""
    return isinstance(manifest, dict) and manifest.get("manifest_sha256") == _self_digest(manifest)


def verify(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Return (manifest, None) for an intact finished stage, else (None, why it cannot be trusted)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"no {MANIFEST} in {folder}"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable {path}: {exc}"
    if not self_checks(manifest):
        return None, f"{path} was edited or corrupted (self-checksum mismatch)"
    for rel, meta in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            return None, f"missing file {p}"
        if p.stat().st_size != meta["size"]:
            return None, f"{p} has {p.stat().st_size} bytes, manifest says {meta['size']} (truncated?)"
        if sha256_file(p) != meta["sha256"]:
            return None, f"{p} does not match its sha256 in the manifest"
    return manifest, None


@dataclass
class StageResult:
    manifest: dict[str, Any]
    cached: bool

    @property
    def folder(self) -> Path:
        return Path(self.manifest["folder"])


@contextlib.contextmanager
def _locked(lock_path: Path, what: str) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s is being produced by another run; waiting for it", what)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _discard(folder: Path) -> None:
    """Move a folder aside (atomic) and delete it, so a crash mid-delete never leaves a half folder."""
    if folder.exists():
        trash = folder.with_name(f".{folder.name}.trash-{uuid.uuid4().hex[:8]}")
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


LAST = "last.json"


def record(workdir: Path | str, stage: str, state: str, **detail: Any) -> None:
    """Write ``<stage>/last.json`` (what ``colorize status`` shows): the one writer of that file. Best
    effort: a full disk must not turn a stage's real error into a second one about bookkeeping."""
    with contextlib.suppress(OSError):
        write_json(
            Path(workdir) / stage / LAST,
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "state": state, **redact_obj(detail)},
        )


Inputs = Mapping[str, Any] | Sequence[Mapping[str, Any]]


def _refs(inputs: Inputs) -> dict[str, Any]:
    named = inputs if isinstance(inputs, Mapping) else {str(i): m for i, m in enumerate(inputs)}
    out: dict[str, Any] = {}
    for role, value in named.items():
        if value is None:
            out[role] = None
        elif isinstance(value, Mapping):
            out[role] = input_ref(value)
        else:
            out[role] = [input_ref(m) for m in value]
    return out


def _content_only(refs: Any) -> Any:
    if isinstance(refs, dict) and "content" in refs:
        return {"stage": refs["stage"], "content": refs["content"]}
    if isinstance(refs, dict):
        return {k: _content_only(v) for k, v in refs.items()}
    if isinstance(refs, list):
        return [_content_only(v) for v in refs]
    return refs


def make_plan(
    workdir: Path | str,
    stage: str,
    inputs: Inputs,
    config: Mapping[str, Any],
    code: str,
    facts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that decides a stage's output, as plain JSON: the stage's own settings section
    (``config``), what was resolved for this run (``facts``: the seed, the variant, which weights were
    found), its inputs' manifests, and its code identity. The key hashes all of them; it is Prefect's
    cache key and names the stage folder."""
    plan = {
        "workdir": str(Path(workdir).resolve()),
        "stage": stage,
        "inputs": json.loads(canonical_json(inputs if isinstance(inputs, Mapping) else list(inputs))),
        "config": json.loads(canonical_json(config)),
        "facts": json.loads(canonical_json(facts or {})),
        "code": code,
    }
    # Inputs count by content: an upstream stage that reran (new config or code) but wrote the same bytes
    # leaves every downstream key unchanged. Upstream keys are kept in the manifest for traceability only.
    keyed = {
        **{k: plan[k] for k in ("stage", "config", "facts", "code")},
        "inputs": _content_only(_refs(inputs)),
    }
    plan["key"] = digest(keyed)[:16]
    return plan


def plan_folder(plan: Mapping[str, Any]) -> Path:
    return Path(plan["workdir"]) / plan["stage"] / plan["key"]


def finished(plan: Mapping[str, Any]) -> dict[str, Any] | None:
    """The verified manifest of a planned stage if it is done and intact, else None."""
    manifest, _ = verify(plan_folder(plan))
    if manifest is not None:
        manifest["folder"] = str(plan_folder(plan))
    return manifest


def run_stage(
    plan: Mapping[str, Any], work: Callable[[Path], Mapping[str, Any]], *, force: bool = False
) -> StageResult:
    """Produce the planned stage folder unless an intact one exists; return its manifest.

    ``work(partial_dir)`` writes the outputs (each file atomically) and returns extra manifest fields
    (counts, seed, ...). It may keep resumable state in ``partial_dir/scratch``. The manifest is
    written last and the folder renamed into place, so a reader sees a finished stage or none.
    """
    stage, key = plan["stage"], plan["key"]
    final = plan_folder(plan)
    stage_dir = final.parent
    partial = stage_dir / f"{key}.partial"
    with _locked(stage_dir / f"{key}.lock", f"{stage}/{key}"):
        if force:
            _discard(final)
            _discard(partial)
        elif final.exists():
            manifest, problem = verify(final)
            if manifest is not None:
                manifest["folder"] = str(final)
                record(plan["workdir"], stage, "cached", key=key, seconds=0.0)
                return StageResult(manifest, cached=True)
            log.warning("%s/%s: %s; redoing the stage", stage, key, problem)
            _discard(final)
        partial.mkdir(parents=True, exist_ok=True)
        for leftover in [p for p in partial.rglob("*") if is_temp(p)]:
            leftover.unlink(missing_ok=True) if leftover.is_file() else shutil.rmtree(leftover, True)
        start = time.time()
        try:
            extra = dict(work(partial))
        except BaseException as exc:
            error = str(exc) or type(exc).__name__
            record(plan["workdir"], stage, "failed", key=key, seconds=round(time.time() - start, 2), error=error)
            raise
        seconds = round(time.time() - start, 2)
        shutil.rmtree(partial / SCRATCH, ignore_errors=True)
        files = list_files(partial)
        manifest = {
            "stage": stage,
            "key": key,
            "config": redact_config(plan["config"]),  # published by the stage store: no secret in it
            "facts": plan["facts"],
            "inputs": _refs(plan["inputs"]),
            "code_version": plan["code"],
            "files": files,
            "content": digest(files),
            "timings": {"seconds": seconds},
            "versions": versions(),
            **extra,
        }
        manifest["manifest_sha256"] = _self_digest(manifest)
        write_json(partial / MANIFEST, manifest)
        partial.rename(final)
        fsync_dir(stage_dir)
        record(plan["workdir"], stage, "ran", key=key, seconds=seconds)
        manifest["folder"] = str(final)
        return StageResult(manifest, cached=False)


def safe_relative(rel: str) -> bool:
    """A manifest's file name that stays inside its folder: a manifest from elsewhere (a stage store) is
    input, and ``../../x`` in it must not write outside the work dir."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts and parts[0] != SCRATCH


def install(
    plan: Mapping[str, Any], manifest: Mapping[str, Any], fetch: Callable[[list[tuple[str, Path]]], None]
) -> tuple[dict[str, Any] | None, str | None]:
    """Put a stage finished elsewhere in place of the planned folder: ``fetch([(name, dest), ...])`` writes
    every file the manifest lists (in one call, so that a store can move them concurrently), into a temp
    folder that is verified like any stage (sizes, sha256, the manifest's self-checksum) before it is
    renamed into place, under the stage's lock. Returns (the manifest, None), or (None, why it was
    refused); a folder already finished here is kept."""
    if (manifest.get("stage"), manifest.get("key")) != (plan["stage"], plan["key"]):
        return None, f"it is {manifest.get('stage')}/{manifest.get('key')}, not {plan['stage']}/{plan['key']}"
    bad = [rel for rel in manifest.get("files", {}) if not safe_relative(rel)]
    if bad:
        return None, f"its manifest names a file outside the stage folder: {bad[0]!r}"
    names = set(manifest.get("files", {}))
    folders = {str(parent) for rel in names for parent in PurePosixPath(rel).parents}
    if clash := sorted(names & folders):
        return None, f"its file names clash: {clash[0]!r} is both a file and a folder"
    final = plan_folder(plan)
    with _locked(final.parent / f"{plan['key']}.lock", f"{plan['stage']}/{plan['key']}"):
        if (done := finished(plan)) is not None:
            return done, None
        for stale in final.parent.glob(f".{final.name}{TMP_MARK}*"):  # a pull killed before its rename
            shutil.rmtree(stale, ignore_errors=True)
        tmp = temp_name(final)
        try:
            pairs = [(rel, tmp / rel) for rel in manifest["files"]]
            for _, dest in pairs:
                dest.parent.mkdir(parents=True, exist_ok=True)
            fetch(pairs)
            write_json(tmp / MANIFEST, {k: v for k, v in manifest.items() if k != "folder"})
            checked, problem = verify(tmp)
            if checked is None:
                return None, problem.replace(str(tmp), f"{plan['stage']}/{plan['key']}") if problem else problem
            _discard(final)
            tmp.rename(final)
            fsync_dir(final.parent)
            _discard(final.with_name(f"{final.name}.partial"))  # a local attempt's leftovers, now moot
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**checked, "folder": str(final)}, None


def load_manifest(folder: Path | str) -> dict[str, Any]:
    """Load and verify a finished stage, raising a one-line StageError if it cannot be trusted."""
    manifest, problem = verify(Path(folder))
    if manifest is None:
        raise StageError(problem)
    manifest["folder"] = str(folder)
    return manifest
