"""Archive extraction that refuses entries escaping the target folder (zip-slip, tar ``../``, absolute
paths, links pointing outside). Extraction goes to a temp folder renamed into place, so an archive that
fails half way leaves nothing behind."""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from storage.atomic import temp_name
from storage.errors import DataError


class UnsafeArchiveError(DataError):
    """An archive entry would be written outside the destination folder."""


def _check_member(name: str, archive: Path) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive.name}: entry {name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise UnsafeArchiveError(f"{archive.name}: entry {name!r} escapes the target folder; refusing to extract")


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_member(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchiveError(f"{archive.name}: entry {info.filename!r} is a symlink; refusing")
        bad = zf.testzip()
        if bad is not None:
            raise DataError(f"{archive.name}: entry {bad!r} is corrupt (CRC mismatch)")
        zf.extractall(dest)


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            _check_member(m.name, archive)
            if m.issym() or m.islnk():
                target = PurePosixPath(m.name).parent / m.linkname if m.issym() else PurePosixPath(m.linkname)
                if PurePosixPath(m.linkname).is_absolute() or ".." in target.parts:
                    raise UnsafeArchiveError(f"{archive.name}: link {m.name!r} -> {m.linkname!r} points outside")
            elif not (m.isfile() or m.isdir()):
                raise UnsafeArchiveError(f"{archive.name}: entry {m.name!r} is a device or fifo; refusing")
        tf.extractall(dest, filter="data")  # the stdlib's own traversal filter, as a second line


def extract(archive: Path | str, dest: Path | str) -> Path:
    """Extract a .zip or tar(.gz/.bz2/.xz) archive into ``dest`` (replaced atomically)."""
    archive, dest = Path(archive), Path(dest)
    tmp = temp_name(dest)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp)
        else:
            raise DataError(f"{archive.name}: not a zip or tar archive")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
