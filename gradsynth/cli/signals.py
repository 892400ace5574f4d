"""SIGTERM and SIGHUP handled like SIGINT, and short sections that an interrupt must not split.

While `interrupts_raise` is active, each of SIGINT, SIGTERM and SIGHUP raises `Interrupted`
(a ``KeyboardInterrupt``), so the same ``finally`` blocks that clean up after Ctrl-C clean up
after ``kill`` or a closed terminal. Inside `deferred` (the renames that publish an output
folder) a signal is only recorded; `deferred` yields a function that returns it afterwards,
so that the caller can finish a consistent state first.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_state: dict[str, list[int]] = {"deferring": [], "pending": []}


class Interrupted(KeyboardInterrupt):
    """A signal asked the command to stop; ``written`` is the output folder completed before it."""

    def __init__(self, signum: int, written: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.written = written


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["deferring"]:
        _state["pending"].append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise `Interrupted`; handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {signum: signal.signal(signum, _handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def deferred() -> Iterator[Callable[[], int | None]]:
    """Hold signals back during the block; yields a function giving the first one that came, if any."""
    _state["deferring"].append(1)
    first: list[int] = []
    try:
        yield lambda: first[0] if first else None
    finally:
        _state["deferring"].pop()
        if not _state["deferring"]:
            first.extend(_state["pending"][:1])
            _state["pending"].clear()
