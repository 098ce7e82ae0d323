"""A stage store: finished stage folders shared through object storage (``s3://bucket/prefix``, or
another fsspec URL every machine reaches), so that another machine, a fresh work dir or a lost disk
gets them back instead of recomputing them.

The work dir stays where stages are computed (engines and WebDataset readers want local files); the
store is where finished stages live for everyone. After a stage finishes (or is found finished), the
flow **publishes** it: every file under ``<url>/<stage>/<key>/``, then ``manifest.json`` last. Before a
stage would run, the flow **pulls** it if the store has it: each object is downloaded and the folder is
verified (sizes, sha256, the manifest's self-checksum) before it is renamed into the work dir.

S3 has no rename, so the guarantee "a reader sees a finished stage or none" is kept by the order of
writes and by verification: a stage counts as finished in the store only when its manifest object
exists, its self-checksum holds and every object it lists is there at its size; its contents are
checked byte for byte (sha256) by whoever pulls it. A killed upload leaves objects but no manifest (not
finished); a replaced stage has its old manifest deleted before any object is overwritten; a tampered
object fails the pull's check, its manifest is deleted and the stage is recomputed and published
again. Objects are written under the final prefix and not under a temporary one copied into place:
each PUT is atomic on its own, the manifest is the commit record, and a copy would write every byte
twice.

A stage's objects move concurrently: one batched ``put`` (publish) or ``get`` (pull) of all its files,
which s3fs runs as ``TRANSFERS`` requests at a time (each in flight holds up to a file in memory: s3fs
reads files under 100 MiB whole), the manifest alone after them.

Credentials come from the usual AWS environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``~/.aws``; ``AWS_ENDPOINT_URL_S3`` for a non-AWS server) through s3fs/botocore; they
are never part of the URL, a setting or a message. Client settings that are not secrets go in
``store.options``, fsspec's storage options for the URL's protocol (``endpoint_url``, ``client_kwargs``,
``config_kwargs``...): :func:`configure` makes them fsspec's configuration for that protocol in this
process and, through ``FSSPEC_<PROTOCOL>``, in every process it starts (Dask's local workers, torchrun's
ranks); workers on other machines take the same variable. The store has no lock of its own: runs that share a
store should share one orchestrator (concurrent ones are safe, since nothing unverified is used, but may
compute a stage twice).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fsspec.callbacks import Callback
from pydantic import field_validator

from storage.errors import ConfigError, TransientError
from storage.redact import credential_paths
from storage.settings import Section, flow_setting
from storage.stage import MANIFEST, install, self_checks, verify

log = logging.getLogger(__name__)
_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
TRANSFERS = 16  # files in flight at once in a stage's publish or pull


class Settings(Section):
    """The store section: where finished stages are shared. Not in any stage's key: a stage's output
    does not depend on where it is kept."""

    url: str | None = flow_setting(
        None, description="s3://bucket/prefix (or an fsspec URL all machines reach): publish stages there, pull from it"
    )
    options: dict[str, Any] = flow_setting(
        {},
        description="fsspec storage options for the store's protocol (endpoint_url, client_kwargs, config_kwargs...); "
        "never credentials, which come from the environment",
    )

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        found = sorted(credential_paths(options))
        if found:
            raise ValueError(f"must not hold credentials ({', '.join(found)}): set them in the environment (AWS_...)")
        return options


def configure(url: str, options: Mapping[str, Any]) -> None:
    """Make ``options`` fsspec's configuration for ``url``'s protocol here and in child processes (see
    the module docstring): every file system of that protocol opened by this process or a worker it
    starts uses the same endpoint and client settings (an ``s3://`` download URL too). Merged into any
    fsspec configuration already there; nothing changes without options."""
    if not options:
        return
    import fsspec.config
    from fsspec.core import split_protocol

    protocol = split_protocol(url)[0] or "file"
    fsspec.config.conf.setdefault(protocol, {}).update(options)
    os.environ[f"FSSPEC_{protocol.upper()}"] = json.dumps(fsspec.config.conf[protocol])


def _quiet(message: str) -> str:
    """A server's error message without any credential in it (some servers echo the key id)."""
    for name in _SECRETS:
        if value := os.environ.get(name):
            message = message.replace(value, "***")
    return message


class StageStore:
    """Finished stage folders under one URL prefix (see the module docstring)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        if "@" in self.url.split("://", 1)[-1].split("/", 1)[0]:
            raise ConfigError("store.url must not hold credentials: set them in the environment (AWS_...)")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(options or {}))
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"store.url={url}: {exc}") from None
        self.root = self.root.rstrip("/")

    @classmethod
    def of(cls, settings: Settings | Mapping[str, Any] | None) -> StageStore | None:
        """The run's store, or None without ``store.url``; its options become fsspec's configuration for
        the protocol (:func:`configure`), for the shard jobs' own file systems too."""
        s = settings if isinstance(settings, Settings) else Settings.model_validate(settings or {})
        if not s.url:
            return None
        configure(s.url, s.options)
        return cls(s.url, s.options)

    def _path(self, stage: str, key: str, rel: str = "") -> str:
        return "/".join(p for p in (self.root, stage, key, rel) if p)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """One store operation, its failures as one-line errors: the user's setup (credentials, bucket)
        exits 2; an unreachable or failing server is transient (rerun); a missing object is the caller's
        to handle; anything else is a bug and keeps its traceback."""
        try:
            return fn(*args, **kw)
        except PermissionError as exc:
            raise ConfigError(
                f"store {self.url} refused the credentials ({_quiet(str(exc))}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for it"
            ) from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise TransientError(f"store {self.url}: {what} failed: {_quiet(str(exc))}") from None
        except Exception as exc:
            kind = _botocore_kind(exc)
            if kind == "credentials":
                raise ConfigError(
                    f"store {self.url}: no usable S3 credentials ({_quiet(str(exc))}): set AWS_ACCESS_KEY_ID "
                    "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
                ) from None
            if kind == "connection":
                raise TransientError(f"store {self.url}: {what} failed: {_quiet(str(exc))}") from None
            raise

    def check(self) -> None:
        """Before any work: the store is reachable, the credentials are accepted for reading and
        writing under the prefix, the bucket exists (a run that fails to publish hours later is worse)."""
        probe = f"{self.root}/.colorize-write-check-{uuid.uuid4().hex[:12]}"
        try:
            self._call("writing a test object", self.fs.pipe_file, probe, b"ok")
            self._call("deleting a test object", self.fs.rm_file, probe)
        except FileNotFoundError:
            bucket = self.root.split("/", 1)[0]
            raise ConfigError(f"store {self.url}: the bucket {bucket!r} does not exist; create it first") from None
        finally:
            self.fs.invalidate_cache()

    def manifest(self, stage: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None) when the store holds a finished stage: its manifest object exists and checks
        itself, and every object it lists is there at its recorded size; else (None, why not)."""
        self.fs.invalidate_cache()
        try:
            raw = self._call("reading a manifest", self.fs.cat_file, self._path(stage, key, MANIFEST))
        except FileNotFoundError:
            return None, f"no {stage}/{key} in {self.url}"
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            return None, f"unreadable manifest of {stage}/{key} in {self.url}: {exc}"
        if not self_checks(manifest) or not _well_formed(manifest.get("files")):
            return None, f"the manifest of {stage}/{key} in {self.url} was edited or corrupted"
        try:
            listed = self._call("listing a stage", self.fs.find, self._path(stage, key), detail=True)
        except FileNotFoundError:
            listed = {}
        prefix = self._path(stage, key) + "/"
        sizes = {name.removeprefix(prefix): info.get("size") for name, info in listed.items()}
        for rel, meta in manifest["files"].items():
            if sizes.get(rel) != meta["size"]:
                return None, f"{stage}/{key} in {self.url}: {rel} is missing or has the wrong size"
        return manifest, None

    def publish(self, folder: Path | str, progress: Callable[[int, int], None] | None = None) -> bool:
        """Upload a finished local stage unless the store already holds the same files (the content
        digest: a copy of the key made anywhere); True if it uploaded. Its files go concurrently, in one
        batched put (``progress(done, total)`` as each lands), the manifest alone after them; an older
        manifest is deleted before any object is overwritten."""
        local, problem = verify(Path(folder))
        if local is None:
            raise TransientError(f"cannot publish {folder}: {problem}")
        stage, key = local["stage"], local["key"]
        remote, _ = self.manifest(stage, key)
        if remote is not None and remote["content"] == local["content"]:  # the same files, made anywhere
            return False
        with contextlib.suppress(FileNotFoundError):
            self._call("deleting a stale manifest", self.fs.rm_file, self._path(stage, key, MANIFEST))
        names = list(local["files"])
        sources = [str(Path(folder) / rel) for rel in names]
        targets = [self._path(stage, key, rel) for rel in names]
        self._call("uploading", self.fs.put, sources, targets, callback=_Progress(progress), batch_size=TRANSFERS)
        self._call("uploading", self.fs.put_file, str(Path(folder) / MANIFEST), self._path(stage, key, MANIFEST))
        log.info("published %s/%s to %s (%d files)", stage, key, self.url, len(local["files"]))
        return True

    def pull(self, plan: Mapping[str, Any]) -> dict[str, Any] | None:
        """The planned stage from the store into the work dir, verified; None (with the reason logged)
        if the store does not hold it finished and intact."""
        stage, key = plan["stage"], plan["key"]
        remote, why = self.manifest(stage, key)
        if remote is None:
            log.debug("%s", why)
            return None

        def fetch(pairs: list[tuple[str, Path]]) -> None:
            sources = [self._path(stage, key, rel) for rel, _ in pairs]
            self._call("downloading", self.fs.get, sources, [str(dest) for _, dest in pairs], batch_size=TRANSFERS)

        try:
            manifest, problem = install(plan, remote, fetch)
        except FileNotFoundError as exc:  # an object deleted since the manifest was read
            manifest, problem = None, f"an object vanished: {exc}"
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:  # names like "a" and "a/b"
            manifest, problem = None, f"its file names clash: {exc}"
        if manifest is None:
            log.warning("%s/%s in %s failed verification (%s); recomputing it", stage, key, self.url, problem)
            self._unfinish(stage, key, remote["manifest_sha256"])
            return None
        log.info("pulled %s/%s from %s", stage, key, self.url)
        return manifest

    def _unfinish(self, stage: str, key: str, failed: str) -> None:
        """Delete the manifest that failed verification, so no reader trusts it again; the recomputed
        stage is published over it. Not if it changed meanwhile: a republished stage may be good."""
        current, _ = self.manifest(stage, key)
        if current is not None and current["manifest_sha256"] == failed:
            with contextlib.suppress(FileNotFoundError):
                self._call("deleting a bad manifest", self.fs.rm_file, self._path(stage, key, MANIFEST))


class _Progress(Callback):
    """fsspec's callback for a batch transfer, calling ``report(done, total)`` as each file completes."""

    def __init__(self, report: Callable[[int, int], None] | None) -> None:
        super().__init__()
        self.report = report

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self.report is not None and self.size and self.value:
            self.report(self.value, self.size)


def _well_formed(files: Any) -> bool:
    """A manifest's file table is ``{name: {"size": int, "sha256": str}}``: anything else from a store is
    not a stage (and must not raise deep inside a pull)."""
    return isinstance(files, dict) and all(
        isinstance(rel, str)
        and isinstance(meta, dict)
        and isinstance(meta.get("size"), int)
        and isinstance(meta.get("sha256"), str)
        for rel, meta in files.items()
    )


def _botocore_kind(exc: BaseException) -> str | None:
    """'credentials' or 'connection' for botocore's own errors (s3fs passes them through), else None."""
    try:
        from botocore import exceptions as bx
    except ImportError:
        return None
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return "credentials"
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError):
        return "connection"
    return None
