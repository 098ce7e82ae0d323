"""The base of every error whose message is written for the user (one line, says what to do next).

Kept free of heavy imports so the CLI can catch these without importing torch first.
"""


class UserFacingError(RuntimeError):
    """Report ``str(exc)`` as ``error: ...`` and exit non-zero; no traceback."""
