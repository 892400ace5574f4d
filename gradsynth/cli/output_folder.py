"""Output folders that are complete or absent, never half-written, never lost, never hidden.

Before any work, `check_output_folder` refuses a ``--out`` that is a file, lies under a file,
is in a folder this process cannot write, is the current folder (or contains it), or is a
non-empty folder without ``--overwrite``. Everything is then written into a hidden staging
folder next to ``--out`` (``.<name>.partial-<pid>``) and published by one atomic rename when
the command succeeded; on failure or interrupt the staging folder is removed. If ``--out``
appeared meanwhile (another run), the rename refuses and the complete result is kept under a
visible name that the error line gives. With ``--overwrite`` the old folder is moved aside,
the new one renamed in and the old one deleted, with signals held back until that is done.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gradsynth.cli.errors import CliError
from gradsynth.cli.signals import Interrupted, deferred

# Raised while writing the result: a full disk, a quota, a folder made read-only meanwhile.
try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover - safetensors comes with transformers
    _SafetensorError = OSError  # type: ignore[assignment,misc]
WRITE_ERRORS = (OSError, _SafetensorError)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(out: Path, overwrite: bool) -> Path:
    """Refuse an unusable ``--out`` before doing any work; returns it as an absolute path."""
    given, out = out, Path(os.path.abspath(out))
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        raise CliError(
            f"--out {given}: is the current folder or contains it, which cannot be replaced; "
            f"give a new folder, e.g. --out {Path(given) / 'run'}"
        )
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {given}: is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(
            f"--out {given}: folder exists and is not empty; pass --overwrite or choose another --out"
        )
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise CliError(f"--out {given}: {parent} is a file, not a folder; choose another --out")
    try:  # the only reliable test of writability (permissions, read-only mounts, root)
        Path(tempfile.mkdtemp(prefix=".gradsynth-probe-", dir=parent)).rmdir()
    except OSError as err:
        raise CliError(
            f"--out {given}: cannot write in {parent} ({_reason(err)}); choose a writable --out"
        ) from err
    return out


def _keep(staging: Path, out: Path) -> Path:
    """Give a complete staged result a visible name next to ``out``."""
    kept = out.with_name(f"{out.name}.kept-{os.getpid()}")
    try:
        staging.rename(kept)
    except OSError:
        return staging
    return kept


def _publish(staging: Path, out: Path, given: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``out`` atomically; refuse (keeping the result) if that would lose data."""
    old = None
    if overwrite and out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        staging.rename(out)  # replaces an empty folder, refuses a non-empty one
    except OSError as err:
        if old is not None and not out.exists():
            old.rename(out)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise CliError(
                f"--out {given}: appeared while this run was working (another run?) and is left as it was; "
                f"this run's result is in {_keep(staging, out)}"
            ) from err
        raise CliError(
            f"--out {given}: could not be written ({_reason(err)}); this run's result is in {staging}"
        ) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``out``, on failure it disappears.

    ``out`` was checked by `check_output_folder` before the work; what changed since then is
    handled when publishing, so that a finished result is never thrown away.
    """
    given, out = out, Path(os.path.abspath(out))
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as err:
        raise CliError(f"--out {given}: cannot be created ({_reason(err)}); choose a writable --out") from err
    try:
        yield staging
    except WRITE_ERRORS as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise CliError(
            f"--out {given}: writing the result failed ({_reason(err)}); nothing was kept, "
            "free some space or choose another --out"
        ) from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with deferred() as received:
        try:
            _publish(staging, out, given, overwrite)
        except CliError:
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    signum = received()
    if signum is not None:
        raise Interrupted(signum, written=out)
