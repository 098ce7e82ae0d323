"""The errors whose message is written for the user: one line, saying what to do next.

Kept free of heavy imports so the CLI can catch these without importing torch first. Two questions
decide how the CLI reports one: is it the user's own mistake (a setting, a path, a file they gave:
exit code 2, no resume hint), and can rerunning the same command fix it (interrupted, killed,
a flaky network: then and only then the message says so).
"""


class UserFacingError(RuntimeError):
    """Report ``str(exc)`` as ``error: ...`` and exit 1; no traceback."""

    exit_code = 1
    rerun_helps = False


class ConfigError(UserFacingError, ValueError):
    """Something the user gave (a setting, a path, a dataset) is invalid: exit 2, before any work."""

    exit_code = 2


class DataError(UserFacingError, ValueError):
    """The data the user pointed at is unusable (a hostile or broken archive, a folder of no usable
    photos): rerunning the same command cannot help."""


class TransientError(UserFacingError):
    """A failure outside the user's input that a later rerun can get past (network, a busy store)."""

    rerun_helps = True


def disk_full(exc: BaseException) -> str | None:
    """The one-line message for an exception caused by a full disk (ENOSPC anywhere in its chain, or
    sqlite's own wording), else None: a full disk shows up as a dozen different errors otherwise."""
    import errno

    seen = exc
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "database or disk is full" in str(seen):
            where = f" ({seen.filename})" if getattr(seen, "filename", None) else ""
            return (
                f"no space left on device{where}: free some space, then rerun the same command "
                "(finished stages are kept and verified)"
            )
        seen = seen.__cause__ or seen.__context__
    return None
