"""Where a shard job reads and writes: a folder of the work dir, or a URL prefix (``s3://...``) when the
job runs on a Dask worker that has no share of the work dir and exchanges files through the stage
store instead.

The guarantee is the same both ways: a file appears under its final name only once complete. A local
file is written to a temp name and renamed; an object is written in one PUT, which S3 makes visible
whole or not at all. So a job that sees its output already there can skip it, whichever worker made it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from storage.atomic import atomic_path, is_temp
from storage.errors import DataError, TransientError
from storage.stage import safe_relative, sha256_file

log = logging.getLogger(__name__)


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def join(location: str | Path, *names: str) -> str:
    return "/".join([str(location).rstrip("/"), *names])


def exists(location: str | Path) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = _fs(str(location))
    fs.invalidate_cache()
    return fs.exists(path)


def read_bytes(location: str | Path) -> bytes:
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = _fs(str(location))
    return fs.cat_file(path)


@contextlib.contextmanager
def local_copy(location: str | Path, sha256: str | None = None) -> Iterator[Path]:
    """A local file with the content of ``location``: the file itself, or for a URL a temp copy whose
    sha256 must be ``sha256`` (what the manifest of the stage it belongs to recorded): a worker checks
    every byte it reads from the store, as a pull does, before computing anything from it."""
    if not is_url(location):
        yield Path(location)
        return
    fs, path = _fs(str(location))
    with tempfile.TemporaryDirectory(prefix="colorize-input-") as tmp:
        local = Path(tmp) / Path(path).name
        fs.get_file(path, str(local))
        if sha256 is not None and sha256_file(local) != sha256:
            raise DataError(f"{location} does not match the sha256 its stage's manifest records (changed in the store)")
        yield local


@contextlib.contextmanager
def writing_into(folder: str | Path) -> Iterator[Path]:
    """A local folder to write finished files into (each atomically, as everywhere in this project). For
    a URL it is a temp folder whose files are uploaded, one object each in name order, when the block
    ends without an error; on an error nothing is uploaded."""
    if not is_url(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield Path(folder)
        return
    fs, root = _fs(str(folder))
    with tempfile.TemporaryDirectory(prefix="colorize-upload-") as tmp:
        yield Path(tmp)
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file() and not is_temp(f):
                fs.put_file(str(f), join(root, f.relative_to(tmp).as_posix()))


def download(url: str, names: Iterable[str], dest: Path) -> None:
    """The named objects under ``url`` into ``dest`` (each file written atomically), for the stage
    process that assembles what the workers uploaded. By name, not by listing: a missing one is an
    error here, not a shard silently left out of the stage."""
    fs, root = _fs(url)
    for rel in names:
        if not safe_relative(rel):
            raise ValueError(f"refusing to download {rel!r}: its name leaves {dest}")
        try:
            with atomic_path(dest / rel) as tmp:
                fs.get_file(join(root, rel), str(tmp))
        except FileNotFoundError:
            raise TransientError(f"{join(url, rel)} is missing: a shard job's output was lost; rerun") from None


def remove_folder(url: str, best_effort: bool = True) -> None:
    """Delete every object under ``url``: a stage's exchange prefix once the stage is finished (best
    effort: a store that refuses deletes leaves litter, not a failed run), or before it is redone."""
    fs, root = _fs(url)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - any store's own error: the finished stage itself is fine
        if not best_effort:
            raise
        log.warning("could not remove %s (%s); delete it by hand", url, exc)
