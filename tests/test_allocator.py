"""`keep_freed_memory`: a freed large tensor's pages are reused, not faulted in again.

Each case runs in a fresh interpreter: the setting is process-wide and permanent, and the test
process must keep glibc's defaults.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Allocates, fills and frees a 128 MiB tensor four times; prints the minor page faults of the last time.
_PROBE = """
import json, resource, sys, torch
set_by = None
if sys.argv[1] == "keep":
    from gradsynth import keep_freed_memory
    set_by = keep_freed_memory()
elif sys.argv[1] == "cli":  # the command line run as a program (argv not given)
    from gradsynth.cli import main
    sys.argv = ["gradsynth", "--help"]
    try:
        main()
    except SystemExit:
        pass
def touch():
    t = torch.empty(1 << 25)
    t.fill_(1.0)
    del t
for _ in range(3):  # (a block freed below a later small one is reused once neighbours coalesce)
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"set": set_by, "faults": faults}))
"""
PAGES = (1 << 25) * 4 // 4096  # 32,768 pages of 4 KiB


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    default = _probe("default")
    kept = _probe("keep")
    assert default["faults"] > PAGES // 2  # glibc's default: the freed mmap is faulted in again
    assert kept["set"] is True
    assert kept["faults"] < PAGES // 20


@glibc_only
def test_the_command_line_keeps_freed_memory_unless_switched_off():
    assert _probe("cli")["faults"] < PAGES // 20
    assert _probe("cli", GRADSYNTH_KEEP_FREED_MEMORY="0")["faults"] > PAGES // 2


def test_keeping_is_refused_quietly_where_the_c_library_is_not_glibc(monkeypatch):
    from gradsynth import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.keep_freed_memory() is False
