"""The files of a world cache entry: a checksum manifest, shareable modes, stale temporaries.

``manifest.json`` maps every other file of the entry to its size in bytes and its SHA-256,
computed when the entry is written. `verify_manifest` recomputes both, so a truncated, changed
or missing file is caught before anything is loaded from it; for a cache entry it also refuses a
file that is a link, another user's, or writable by others (`gradsynth.owned_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from gradsynth.owned_files import Untrusted, open_trusted

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20
# world-<size>-<key>.tmp-<pid>-<mkdtemp's random part> (and .tmp-<pid> of older versions)
_TEMPORARY = re.compile(r"^world-.+\.tmp-(\d+)(-[^/]*)?$")


class CacheDamaged(Exception):
    """A cache entry that does not match its manifest; the message says what is wrong."""


class CacheUntrusted(CacheDamaged):
    """A cache entry that another user could have written (not this user's, or writable by others)."""


def _digest(path: Path, own: bool = False) -> str:
    """SHA-256 of ``path``; with ``own``, of a file `open_trusted` accepts (`CacheUntrusted` if not)."""
    sha = hashlib.sha256()
    try:
        fd = open_trusted(path) if own else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except Untrusted as err:
        raise CacheUntrusted(f"{path.name} {err}") from err
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in ``folder`` (flat) in ``manifest.json``."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _digest(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=2))


def verify_manifest(folder: Path, required: Iterable[str], own: bool = False) -> None:
    """Raise `CacheDamaged` unless every file of the manifest, and every ``required`` one, is intact.

    ``own``: every file, the manifest first, must also be this user's own (`CacheUntrusted`).
    """
    try:
        if own:
            _digest(folder / MANIFEST, own=True)
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or not isinstance(files, dict):
            raise ValueError("unknown manifest version")
    except FileNotFoundError as err:
        raise CacheDamaged(f"{MANIFEST} is missing") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheDamaged(f"{MANIFEST} is unreadable") from err
    missing = [name for name in required if name not in files]
    if missing:
        raise CacheDamaged(f"{missing[0]} is not in {MANIFEST}")
    for name, expected in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise CacheDamaged(f"{name} has {size} bytes, {expected['bytes']} were written")
            if _digest(path, own) != expected["sha256"]:
                raise CacheDamaged(f"{name} does not match its checksum")
        except FileNotFoundError as err:
            raise CacheDamaged(f"{name} is missing") from err
        except OSError as err:
            raise CacheDamaged(f"{name} cannot be read ({err.strerror})") from err
        except (KeyError, TypeError) as err:
            raise CacheDamaged(f"{MANIFEST} is unreadable") from err


def make_shareable(folder: Path) -> None:
    """Folder ``rwxr-xr-x``, files ``rw-r--r--``, whatever the umask (readable by all, written by one).

    Only in a folder of this process's own making; a link is never followed (its target keeps its mode).
    """
    folder.chmod(0o755)
    for path in folder.iterdir():
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(cache: Path) -> None:
    """Delete ``world-*.tmp-<pid>`` folders whose process is gone (killed while saving)."""
    try:
        entries = list(cache.iterdir())
    except OSError:  # no cache yet, or not a folder: nothing to clean
        return
    for path in entries:
        match = _TEMPORARY.match(path.name)
        pid = int(match.group(1)) if match else os.getpid()
        if pid != os.getpid() and not _alive(pid) and stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path, ignore_errors=True)
