"""HTTP downloads that resume, retry with backoff, verify a checksum and never leave a partial file
under the final name.

The partial bytes live in ``<dest>.part`` (resumed with a Range request); the file is renamed to
``dest`` only after its checksum matched. A checksum mismatch deletes the partial file (its bytes are
wrong, resuming would keep them) and retries; after the last try a one-line DownloadError says what to do.

Credentials never travel in the URL (the download stage refuses ``user:password@`` URLs, and every
message shows URLs through :func:`storage.redact.redact_text`): a host that needs HTTP basic auth gets
it from a netrc file (``$NETRC``, else ``~/.netrc``: ``machine HOST login USER password PASS``), as curl
and pip read it. The header is not repeated to the target of a redirect, which may be another host.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import netrc
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from storage.errors import ConfigError, TransientError
from storage.redact import redact_text

log = logging.getLogger(__name__)
_CHUNK = 1 << 16


class DownloadError(TransientError):
    """A download failed for good; the message is one line and says where the file should come from."""


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def netrc_auth(url: str) -> str | None:
    """The ``Authorization`` header value for ``url``'s host from the user's netrc file, if it has one."""
    host = urllib.parse.urlsplit(url).hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    if not host or not path.is_file():
        return None
    try:
        found = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as exc:
        raise ConfigError(f"cannot read the netrc file {path}: {exc}") from None
    if not found:
        return None
    login, _, password = found
    return "Basic " + base64.b64encode(f"{login}:{password or ''}".encode()).decode()


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "colorize-pipeline/0.1"})
    auth = netrc_auth(url)
    if auth:
        req.add_unredirected_header("Authorization", auth)
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - URLs come from config
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # we already hold the whole file
            return
        raise
    with resp:
        if have and resp.status != 206:  # server ignored Range: start again
            have = 0
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        mode = "ab" if have else "wb"
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=Path(urllib.parse.urlsplit(url).path).name or "download",
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while block := resp.read(_CHUNK):
                out.write(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if total is not None and part.stat().st_size < total:
            raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")


def download(
    url: str,
    dest: Path | str,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (reused if already there and valid).

    With no checksum given, the sha256 of the first complete download is recorded beside the file
    (``<dest>.sha256``) and every later use is verified against it (DIV2K publishes no checksums).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recorded = dest.with_name(dest.name + ".sha256")
    if sha256 is None and md5 is None and recorded.exists():
        sha256 = recorded.read_text().split()[0]
    algo, expected = ("md5", md5) if md5 else ("sha256", sha256)

    if dest.exists():
        if expected is None or file_digest(dest, algo) == expected.lower():
            return dest
        log.warning("%s does not match its %s; downloading it again", dest, algo)
        dest.unlink()

    part = dest.with_name(dest.name + ".part")
    shown = redact_text(url)
    last_error = "unknown error"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, part, timeout, progress)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last_error = redact_text(str(getattr(exc, "reason", exc)) or type(exc).__name__)
            log.warning("download of %s failed (try %d of %d): %s", shown, attempt + 1, retries + 1, last_error)
            continue
        got = file_digest(part, algo)
        if expected is not None and got != expected.lower():
            last_error = f"{algo} mismatch (got {got[:12]}..., expected {expected[:12]}...)"
            log.warning("download of %s: %s; deleting it", shown, last_error)
            part.unlink(missing_ok=True)
            continue
        os.replace(part, dest)
        if expected is None:
            recorded.write_text(f"{got}  {dest.name}\n")
        return dest
    raise DownloadError(
        f"could not download {shown} after {retries + 1} tries ({last_error}); "
        f"check the connection or place the file at {dest}"
    )
