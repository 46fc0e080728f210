"""glibc's thresholds raised: a large tensor comes from the heap, not from pages mapped for it
alone, and its memory stays in the heap once freed (glibc's own counters, `mallinfo2`, read in a
process of its own: the thresholds are the whole process's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill.malloc_tuning import GLIBC

pytestmark = pytest.mark.skipif(not GLIBC, reason="glibc only")

# 48 MiB: above glibc's own mmap threshold at any time (32 MiB at most), under ours
_PROBE = """
import ctypes, json, sys
import torch
from distill.malloc_tuning import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
heap_before = libc.mallinfo2().arena
tensor = torch.ones(48 << 18)
mapped = libc.mallinfo2().hblkhd
del tensor
print(json.dumps({"tuned": tuned, "mapped_mib": mapped >> 20,
                  "heap_kept_mib": (libc.mallinfo2().arena - heap_before) >> 20}))
"""


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
        env={**os.environ, **env},
    )  # fmt: skip
    return json.loads(out.stdout)


def test_large_tensors_come_from_the_heap_and_stay_there() -> None:
    default, tuned = _probe("default"), _probe("tune")
    assert default["mapped_mib"] >= 48 and default["heap_kept_mib"] < 48  # glibc's defaults
    assert tuned["tuned"] and tuned["mapped_mib"] < 48 and tuned["heap_kept_mib"] >= 48


def test_the_operators_glibc_tunables_win() -> None:
    probe = _probe("tune", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert not probe["tuned"] and probe["mapped_mib"] >= 48
