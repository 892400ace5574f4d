"""Progress lines on stderr: one when a phase starts and one when it ends, with elapsed time.

Every phase of a run (loading, the evaluation before, the steps, the evaluation after, the
save) writes ``gradsynth [  12.3s] <what>`` lines to stderr, with or without the progress bar,
so that a run on a real model (minutes per phase) is never silent; stdout keeps only the
results. Without the bar, steps are reported at most once every `STEP_EVERY_S` seconds (and at
the last step), so a fast run does not flood the terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

STEP_EVERY_S = 5.0
_start: list[float] = []


def elapsed() -> float:
    """Seconds since the first progress line of this process."""
    if not _start:
        _start.append(time.perf_counter())
    return time.perf_counter() - _start[0]


def note(text: str) -> None:
    """One progress line on stderr, stamped with the elapsed time."""
    stamp = elapsed()
    print(f"gradsynth [{stamp:7.1f}s] {text}", file=sys.stderr, flush=True)


@contextmanager
def phase(what: str) -> Iterator[None]:
    """``what ...`` before the block and ``what: done in 1.2s`` after it (nothing if it fails)."""
    note(f"{what} ...")
    start = time.perf_counter()
    yield
    note(f"{what}: done in {time.perf_counter() - start:.1f}s")


class StepLines:
    """Step lines for a run without a bar: ``step 3/60: forget 1.234, retain 0.456 (2.1s/step)``."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.start = self.last = time.perf_counter()

    def step(self, step: int, text: str, last: bool = False) -> None:
        """Report ``step`` if it is the first or ``last``, or `STEP_EVERY_S` passed since the last line."""
        now = time.perf_counter()
        if now - self.last < STEP_EVERY_S and step != 1 and step != self.total and not last:
            return
        self.last = now
        note(f"{self.label} step {step}/{self.total}: {text} ({(now - self.start) / step:.1f}s/step)")
