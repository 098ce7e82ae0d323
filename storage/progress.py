"""How far long work has got, told to whoever listens.

Stages report with :func:`report` (shards mapped, training steps) without knowing who listens: the flow
installs a listener for the stage it runs (a Prefect progress artifact on the run's page), a test may
install another, and without one a report costs a context-variable lookup. The listener is per context
(a ``ContextVar``), so stages running side by side in threads each report to their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Listener = Callable[[float, str], None]  # (fraction done in [0, 1], what is being done)
_listener: ContextVar[Listener | None] = ContextVar("colorize_progress", default=None)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send this context's reports to ``listener`` inside the block."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def report(done: int, total: int, what: str = "") -> None:
    """``done`` of ``total`` units finished; ignored without a listener or a total."""
    listener = _listener.get()
    if listener is not None and total > 0:
        listener(min(1.0, max(0.0, done / total)), what)
