"""Progress lines on stderr: when a slow phase starts and when it ends, with the elapsed time.

Every phase of a run (loading, the evaluation before, the steps, the evaluation after, the
save) reports itself on stderr as ``gradsynth [  12.3s] <what> ...`` and then
``<what>: done in 8.1s``, with or without the progress bar, so that a run on a real model
(minutes per phase) is never silent; stdout keeps only the results. A phase that ends within
`QUIET_S` seconds writes nothing, so fast runs (the embedded world) and one-line errors stay as
they were. Steps are reported at most once every `STEP_EVERY_S` seconds, and the first and last
step when a step takes `QUIET_S` or more.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_S = 1.0
STEP_EVERY_S = 5.0
_start: list[float] = []
_lock = threading.Lock()


def elapsed() -> float:
    """Seconds since the first phase of this process began."""
    if not _start:
        _start.append(time.perf_counter())
    return time.perf_counter() - _start[0]


def note(text: str) -> None:
    """One progress line on stderr, stamped with the elapsed time."""
    with _lock:
        print(f"gradsynth [{elapsed():7.1f}s] {text}", file=sys.stderr, flush=True)


@contextmanager
def phase(what: str) -> Iterator[None]:
    """``what ...`` once the block has run `QUIET_S` seconds, and ``what: done in 8.1s`` after it
    (nothing for a block that ends sooner, and no "done" for one that fails)."""
    elapsed()
    start = time.perf_counter()
    timer = threading.Timer(QUIET_S, note, args=(f"{what} ...",))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    seconds = time.perf_counter() - start
    if seconds >= QUIET_S:
        note(f"{what}: done in {seconds:.1f}s")


class StepLines:
    """Step lines for a run without a bar: ``sago, lr 1e-05, seed 0: step 3/60: ... (2.1s/step)``."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.start = self.last = time.perf_counter()

    def step(self, step: int, text: str, last: bool = False) -> None:
        """Report ``step`` if `STEP_EVERY_S` passed since the last line, or if it is the first or
        ``last`` (or final) step and the steps are slow (`QUIET_S` or more each)."""
        now = time.perf_counter()
        per_step = (now - self.start) / step
        edge = step == 1 or step == self.total or last
        if now - self.last < STEP_EVERY_S and not (edge and per_step >= QUIET_S):
            return
        self.last = now
        note(f"{self.label} step {step}/{self.total}: {text} ({per_step:.1f}s/step)")
