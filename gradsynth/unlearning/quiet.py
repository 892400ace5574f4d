"""Silencing the libraries' loggers around a call, so that a failure is the one line we print.

``datasets`` logs an ERROR line of its own before raising (a damaged Parquet or CSV file printed
``Failed to read ...`` above our message), and lm-eval logs its errors as well.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

LIBRARIES = ("datasets", "transformers", "lm_eval", "lm-eval")


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...] = LIBRARIES) -> Iterator[None]:
    """No records from the named loggers (and their children) inside; their levels restored after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
