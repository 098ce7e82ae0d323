"""Where a shard job reads and writes: a folder of the work dir, or a URL prefix (``s3://...``) when the
job runs on a Dask worker that has no share of the work dir and exchanges files through the stage
store instead.

The guarantee is the same both ways: a file appears under its final name only once complete. A local
file is written to a temp name and renamed; an object is written in one PUT, which S3 makes visible
whole or not at all. So a job that sees its output already there can skip it, whichever worker made it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage.atomic import atomic_path, is_temp


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


def download_folder(url: str, dest: Path) -> int:
    """Every object under ``url`` into ``dest`` (same relative names; each file written atomically);
    how many. For the stage process, which assembles what the workers uploaded."""
    fs, root = _fs(url)
    fs.invalidate_cache()
    try:
        names = fs.find(root)
    except FileNotFoundError:
        return 0
    for name in names:
        rel = name[len(root.rstrip("/")) + 1 :]
        if Path(rel).is_absolute() or ".." in Path(rel).parts:  # an S3 key may hold "../"
            raise ValueError(f"refusing to download {name!r}: its name leaves {dest}")
        with atomic_path(dest / rel) as tmp:
            fs.get_file(name, str(tmp))
    return len(names)


def remove_folder(url: str) -> None:
    """Delete every object under ``url`` (a finished stage's exchange prefix); missing is fine."""
    fs, root = _fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(root, recursive=True)
