"""Process-wide tuning for the relay: keep freed buffers in the heap.

glibc serves allocations above its mmap threshold (128 KiB, rising
dynamically) with fresh ``mmap``s and trims freed heap memory back to the
kernel, so a relay that allocates and frees 128-256 KiB buffers (TLS
records leaving OpenSSL's memory BIO, socket reads) page-faults on every
one: measured on this machine, 17% of the forwarding process's CPU went to
page faults and zeroing fresh pages. Raising both thresholds keeps that
memory in the heap; throughput through a tunnel rose from 3.8 to 5.5 Gbit/s.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

_done = False


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Apply once per process; returns False where glibc's mallopt is not there."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
    _done = ok
    return ok
