"""The one redaction of secrets in URLs and settings, for everything that prints, logs, stores or
publishes them: messages and exceptions, ``last.json``, stage manifests (which the stage store
publishes), MLflow params and tags, Prefect's flow parameters and state messages.

What counts as a secret:
- a URL's userinfo (``https://alice:PASSWORD@host/``): everything between ``://`` and the last ``@``
  before the path, a password holding ``@`` included. (The download stage refuses such URLs anyway,
  since it never sends them: credentials go in a netrc, see storage/fetch.py);
- query and fragment parameters whose name looks like a credential (``token``, ``sig``/``signature``,
  ``X-Amz-Credential``, ``access_key``, ``password``, ``auth``, ``session``, ``code``, ``jwt``...), after ``?``,
  ``&``, ``;`` or ``#`` (``#access_token=`` fragments of OAuth redirects);
- a setting whose own name looks like a credential (``token``, ``secret``, ``password``, ``api_key``).

Client options handed to a library (the stage store's ``store.options``) are held to a stricter rule,
:func:`credential_paths`: there any ``key`` or ``Authorization`` is a credential, and they are refused,
not redacted.

Each becomes ``***``. Where a URL must still be told apart from another (a stage's manifest), it is
stored redacted with a digest of the full text, never the text itself (:func:`redact_config`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

MASK = "***"
_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_?key|credential)", re.IGNORECASE)
# Between "://" and the last "@" before the path: user, password, even a password holding "@".
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/?#\s]*@")
_SECRET_PARAM = re.compile(
    r"([?&;#][^=&;#\s]*(?:sig|token|secret|key|pass|credential|auth|session|code|jwt|bearer)[^=&;#\s]*=)[^&;#\s\"']*",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """``text`` with every URL credential and secret-looking query/fragment parameter as ``***``."""
    return _SECRET_PARAM.sub(rf"\1{MASK}", _URL_CREDENTIALS.sub(f"{MASK}@", text))


def redact(key: str, value: Any) -> str:
    """A setting as it may be stored: ``***`` for a secret-named one, else its text redacted, and the
    home folder as ``~`` (a path says nothing more useful with it)."""
    if _SECRET_KEY.search(key):
        return MASK
    text = redact_text(str(value))
    home = str(Path.home())
    return text.replace(home, "~") if home not in ("/", "") else text


def redact_obj(obj: Any) -> Any:
    """Every string inside ``obj`` (dicts, lists) redacted; other values as they are."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def redact_config(obj: Any) -> Any:
    """A settings section as a manifest stores it: a string holding a secret becomes its redacted text
    with the sha256 of the whole (``https://host/c.tgz?token=*** [sha256:1f2e...]``), so two URLs that
    differ only in their secret stay told apart without the secret being written anywhere."""
    if isinstance(obj, str):
        clean = redact_text(obj)
        return obj if clean == obj else f"{clean} [sha256:{hashlib.sha256(obj.encode()).hexdigest()[:16]}]"
    if isinstance(obj, dict):
        return {k: MASK if _SECRET_KEY.search(str(k)) else redact_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_config(v) for v in obj]
    return obj


# In client options (boto's aws_access_key_id, fsspec's key/secret/token, HTTP headers and auth): any of these
# in a name ("kwargs" names such as client_kwargs are not); everything under a ``headers`` entry; and any
# string that reads as a credential (a URL's ``user:password@``, an ``Authorization`` scheme's value).
_CREDENTIAL_OPTION = re.compile(
    r"key|secret|token|passw(or)?d|credential|authori[sz]ation|auth|cookie|session|bearer|kms|signature",
    re.IGNORECASE,
)
_CREDENTIAL_VALUE = re.compile(r"^\s*(bearer|basic|digest|token|negotiate|aws4-hmac-sha256)\s+\S", re.IGNORECASE)


def credential_paths(options: Any, where: str = "") -> set[str]:
    """Where, at any depth (mappings and lists), client options could carry a secret: a name matching
    :data:`_CREDENTIAL_OPTION` (or a list whose first item is such a name: ``[["Cookie", "..."]]``),
    anything under ``headers``, or a string value that carries credentials (``user:password@``, ``Bearer
    ...``)."""
    found = set()
    items = options.items() if isinstance(options, dict) else enumerate(options) if isinstance(options, list) else ()
    for name, value in items:
        path = f"{where}{name}"
        lowered = str(name).lower().replace("kwargs", "")
        named = isinstance(name, str) and bool(_CREDENTIAL_OPTION.search(lowered))
        pair = isinstance(value, (list, tuple)) and value and isinstance(value[0], str)
        named = named or bool(pair and _CREDENTIAL_OPTION.search(value[0].lower()))
        headers = lowered == "headers" and bool(value)
        if named or headers or (isinstance(value, str) and is_credential(value)):
            found.add(path)
        found |= credential_paths(value, f"{path}.")
    return found


def is_credential(text: str) -> bool:
    """Whether a string value itself is a credential: a URL with ``user:password@``, or an
    ``Authorization`` header's value (``Bearer ...``, ``Basic ...``)."""
    return has_userinfo(text) or bool(_CREDENTIAL_VALUE.match(text))


def has_userinfo(url: str) -> bool:
    """Whether ``url`` carries credentials before its host (``user:password@``)."""
    return bool(_URL_CREDENTIALS.search(url))
