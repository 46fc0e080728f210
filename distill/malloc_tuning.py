"""glibc's allocator set up for torch on the CPU: freed tensors stay in the heap for the next step.

glibc serves an allocation above its mmap threshold (128 KiB at start, raised as large blocks
are freed, to 32 MiB at most) with fresh pages from the kernel and hands them back on free, so
every step that allocates a large tensor again faults each of its pages in and zeroes it. A
training step of the default student (bf16, batch 4) allocates and frees hundreds of MiB: with
glibc's defaults it took 1,500–4,500 page faults a step, with a 256 MiB mmap threshold and a 1 GiB
trim threshold 0–400 (docs/benchmarks.md: 5–8 % faster scoring; in training, gains within noise
once glibc has raised its own threshold).

Peak memory does not change; a process keeps up to 1 GiB of freed memory for its next
allocations instead of returning it to the kernel. Nothing is done where the C library is not
glibc, or where `GLIBC_TUNABLES` already sets an allocator option (the operator's word wins).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

# whether this process runs on glibc, the one C library whose thresholds this sets
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_tuned = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent; inherited by the
    children it forks). Returns whether they are set."""
    global _tuned
    if _tuned:
        return True
    if not GLIBC:
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        log.info("GLIBC_TUNABLES sets the allocator: its thresholds left as they are")
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    _tuned = (
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    return _tuned
