"""Output folders that are complete or absent, never half-written, never lost, never hidden.

Before any work, `check_output_folder` refuses a ``--out`` whose name is longer than the file
system allows, that is a symbolic link (``--overwrite`` would replace the link, not the folder it
names: give that folder itself), a file, lies under a file, is in a folder this process cannot
write, is the current folder (or contains it), is or contains one of the run's inputs (the model,
the data files, the task folders, the world cache: writing the result would delete them), or is a
non-empty folder without ``--overwrite``. Everything is then written into a hidden staging folder
next to ``--out`` (``.<name>.partial-<pid>-<random>``, made by ``mkdtemp``, so no file already
there is ever reused or replaced) and published by one atomic rename when the command
succeeded; on failure or interrupt the staging folder is removed. If ``--out`` appeared
meanwhile (another run), the rename refuses and the complete result is kept under a visible
name that the error line gives. With ``--overwrite`` the old folder is moved aside (onto a fresh
``.<name>.old-<pid>-<random>``), the new one renamed in and the old one deleted, with signals
held back until that is done. The hidden names use at most the first 100 bytes of ``--out``'s
name, so any name the file system accepts works.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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


def run_inputs(args: argparse.Namespace) -> list[tuple[str, object]]:
    """What a command reads, as ``(what, path)``, for `check_output_folder` (absent ones are None)."""
    from gradsynth.world import cache_dir  # the world cache, and the C kernels' build cache in it

    model = "MODEL" if getattr(args, "command", None) in ("eval", "audit") else "--model"
    return [
        (model, getattr(args, "model", None)),
        ("--forget", getattr(args, "forget", None)),
        ("--retain", getattr(args, "retain", None)),
        ("--reference-model", getattr(args, "reference_model", None)),
        ("--resume", getattr(args, "resume", None)),
        ("--non-members", getattr(args, "non_members", None)),
        ("--deepspeed-config", getattr(args, "deepspeed_config", None)),
        *(("--include-path", folder) for folder in getattr(args, "include_path", None) or []),
        *((f"--eval {name}", file) for name, file in getattr(args, "eval", None) or []),
        ("the gradsynth cache (GRADSYNTH_CACHE)", cache_dir()),
    ]


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_inputs(out: Path, given: Path, inputs: Iterable[tuple[str, object]]) -> None:
    """Refuse an ``out`` that is, or contains, one of ``inputs`` (compared after resolving links)."""
    from gradsynth.unlearning.data_sources import local_path

    real = Path(os.path.realpath(out))
    for what, value in inputs:
        value = None if value is None else local_path(value)  # a datasets FOLDER:SPLIT is its FOLDER
        if value is None:  # a Hub id, or nothing given
            continue
        path = Path(os.path.realpath(value))
        if path == real or real in path.parents:
            relation = "is" if path == real else "contains"
            raise CliError(
                f"--out {given}: {relation} {what} {value}, which writing the result would delete; "
                "choose another --out"
            )


def check_output_folder(out: Path, overwrite: bool, inputs: Iterable[tuple[str, object]] = ()) -> Path:
    """Refuse an unusable ``--out`` before doing any work; returns it as an absolute path.

    ``inputs``: what the command reads, as ``(what, path)`` pairs (`run_inputs`); an ``--out``
    that is one of them or contains one is refused.
    """
    given, out = out, Path(os.path.abspath(out))
    cwd = Path.cwd()
    # Every part of the path first: a part too long makes even looking at the path fail.
    longest = max(out.parts, key=lambda part: len(os.fsencode(part)))
    size, limit = len(os.fsencode(longest)), _name_max(Path(out.anchor))
    if size > limit:
        raise CliError(
            f"--out {given}: the name {'is' if longest == out.name else 'of a folder in it is'} {size} "
            f"bytes, longer than this file system allows ({limit}); give a shorter name"
        )
    parent = _nearest_existing(out.parent)
    if out == cwd or out in cwd.parents:
        raise CliError(
            f"--out {given}: is the current folder or contains it, which cannot be replaced; "
            f"give a new folder, e.g. --out {Path(given) / 'run'}"
        )
    if out.is_symlink():
        raise CliError(
            f"--out {given}: is a symbolic link (to {os.readlink(out)}); give the folder itself or a new name"
        )
    _check_inputs(out, given, inputs)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {given}: is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(
            f"--out {given}: folder exists and is not empty; pass --overwrite or choose another --out"
        )
    if not parent.is_dir():
        raise CliError(f"--out {given}: {parent} is a file, not a folder; choose another --out")
    try:  # the only reliable test of writability (permissions, read-only mounts, root)
        Path(tempfile.mkdtemp(prefix=".gradsynth-probe-", dir=parent)).rmdir()
    except OSError as err:
        raise CliError(
            f"--out {given}: cannot write in {parent} ({_reason(err)}); choose a writable --out"
        ) from err
    return out


def _beside(out: Path, template: str) -> Path:
    """A fresh empty folder next to ``out``, named by ``template`` (``{name}``: 100 bytes at most)."""
    name = os.fsdecode(os.fsencode(out.name)[:100])
    return Path(tempfile.mkdtemp(prefix=template.format(name=name, pid=os.getpid()), dir=out.parent))


def _keep(staging: Path, out: Path) -> Path:
    """Give a complete staged result a visible name next to ``out``."""
    try:
        kept = _beside(out, "{name}.kept-{pid}-")
    except OSError:
        return staging
    try:
        staging.rename(kept)  # onto the fresh empty folder: nothing already there is replaced
    except OSError:
        kept.rmdir()
        return staging
    return kept


def _publish(staging: Path, out: Path, given: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``out`` atomically; refuse (keeping the result) if that would lose data."""
    old = None
    if overwrite and out.is_dir() and not out.is_symlink():
        old = _beside(out, ".{name}.old-{pid}-")
        try:
            out.rename(old)  # onto the fresh empty folder: a file already there is never touched
        except OSError:
            old.rmdir()  # out went away or changed kind meanwhile: the rename below decides
            old = None
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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = _beside(out, ".{name}.partial-{pid}-")
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
