"""Keeping freed memory in the process, so that a CPU training step does not fault it back in.

With glibc's defaults, an allocation over the mmap threshold (at most 32 MiB: an embedding's
gradient, the logits) is a fresh ``mmap`` that ``free`` hands back to the kernel, and the top of
the heap is trimmed once it holds more than the trim threshold free. Every training step then
allocates its gradient sets, activations and logits anew, and the kernel zero-fills each page
on its first touch: on SmolLM2-135M (one thread, 4 x 32 tokens a task, AMD EPYC) a plain
step took 157k-169k minor page faults and 0.35 s of system time out of 3.5 s.

A two-task step holds one more gradient set than a plain one (the forget gradient while the
retain gradient is computed), so it faults about 40k pages (160 MB) more, a few percent of
the step. `keep_freed_memory` tells glibc never to trim the heap and never to use ``mmap``:
freed memory stays in the process and is reused, and in the same measurement both steps took
no page fault and no system time (about 10 % faster each).

The price: the process keeps its peak heap for its lifetime (resident memory does not shrink
after a peak), and the peak itself is higher (heap fragmentation, by an amount that varies from
run to run): 4 % (150 MB) on a whole SmolLM2 command-line run, up to
1.8 gradient sets on a synthetic stack of layers, where glibc's defaults do as badly
(``benchmarks/memory_peak.py --keep-freed-memory``, docs/memory.md). The setting
is process-wide, so nothing in gradsynth's library layers calls it: the ``gradsynth`` command
line does (``GRADSYNTH_KEEP_FREED_MEMORY=0`` turns that off), and a custom loop may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Set to ``0`` to keep glibc's defaults in the ``gradsynth`` command line.
ENV_SWITCH = "GRADSYNTH_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (no trimming, no ``mmap``); True when
    set, False where the C library is not glibc (macOS, Windows, musl), which is left as it is.

    Process-wide and permanent for the process: call it once, before the first step.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 disables trimming (mallopt(3)); 0 mmap-ed chunks makes every allocation come from the heap.
    return bool(mallopt(_M_TRIM_THRESHOLD, -1)) and bool(mallopt(_M_MMAP_MAX, 0))


def keep_freed_memory_unless_switched_off() -> bool:
    """`keep_freed_memory` unless ``GRADSYNTH_KEEP_FREED_MEMORY=0`` (what the command line calls)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    return keep_freed_memory()


__all__ = ["ENV_SWITCH", "keep_freed_memory", "keep_freed_memory_unless_switched_off"]
