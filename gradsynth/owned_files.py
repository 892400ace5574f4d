"""Files and folders that only the current user could have written: the shared-machine checks.

A cache folder is trusted when it is owned by the effective user and is not writable by its group
or by others (``mode & 0o022 == 0``): then nobody else can add, replace or rename anything in it
(root aside). A file is trusted when it is a regular file (not a symbolic link), owned by the
effective user and not writable by group or others; `open_trusted` checks that on the open file
descriptor itself, so the file checked is the file read. Everything here is the lowest layer of
gradsynth: it imports nothing of the package.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class Untrusted(Exception):
    """A file or folder another user could have written; the message says why (``is ...``)."""


def ownership_problem(info: os.stat_result) -> str | None:
    """Why a file or folder with these stats is not trusted, or None when it is."""
    if info.st_uid != os.geteuid():
        return f"is owned by another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def folder_problem(folder: Path, follow: bool = True) -> str | None:
    """Why ``folder`` is not a trusted folder (None when it is, or does not exist).

    ``follow=False`` refuses a symbolic link: for folders this package creates itself.
    """
    try:
        info = os.stat(folder) if follow else os.lstat(folder)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot be inspected ({err.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "is a symbolic link" if stat.S_ISLNK(info.st_mode) else "is not a folder"
    return ownership_problem(info)


def open_trusted(path: Path) -> int:
    """A read-only descriptor of ``path`` after checking it is trusted; `Untrusted` otherwise.

    ``OSError`` (e.g. ``FileNotFoundError``) passes through; a symbolic link is refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if os.path.islink(path):
            raise Untrusted("is a symbolic link") from err
        raise
    info = os.fstat(fd)
    problem = None if stat.S_ISREG(info.st_mode) else "is not a regular file"
    problem = problem or ownership_problem(info)
    if problem:
        os.close(fd)
        raise Untrusted(problem)
    return fd


def read_trusted(path: Path) -> bytes:
    """The bytes of ``path`` after `open_trusted`'s checks."""
    fd = open_trusted(path)
    try:
        return read_all(fd)
    finally:
        os.close(fd)


def read_all(fd: int) -> bytes:
    """Everything from ``fd``'s current offset to its end."""
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


@contextmanager
def locked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (created ``0600``, never through a link).

    ``on_wait`` is called once if another holder makes this one wait. Yields False, holding
    nothing, where the lock file cannot be opened (a read-only cache): the caller then goes on
    unlocked, as if alone.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock
