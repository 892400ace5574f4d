"""Output folders that are complete or absent, never half-written.

Everything is written into a hidden staging folder next to ``--out`` and renamed to ``--out`` only
when the command succeeded; on failure the staging folder is removed. An existing non-empty
``--out`` is refused before any work starts, unless ``--overwrite`` is given (then it is
replaced only at the end, by the complete new folder).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gradsynth.cli.errors import CliError


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder without ``--overwrite``, before doing any work."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(
            f"--out {out}: folder exists and is not empty; pass --overwrite or choose another --out"
        )


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``out``, on failure it disappears."""
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
