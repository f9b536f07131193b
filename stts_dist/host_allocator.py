"""glibc's malloc on CPU training ranks: keep large freed blocks for reuse instead of unmapping them.

glibc serves an allocation above its mmap threshold (128 KiB, rising dynamically up to 32 MiB)
with a fresh ``mmap`` and gives it back to the kernel on ``free``. A CPU training step allocates
and frees the same activation and gradient tensors, many above 32 MiB, every step, so every step
page-faults fresh zeroed pages for all of them; the unpruned model, with the larger tensors,
pays most, which skews pruned-vs-unpruned speed-ups (measured in docs/benchmarks.md, "the whole
trainer"). ``M_MMAP_MAX = 0`` serves them from the heap and a very high ``M_TRIM_THRESHOLD``
keeps freed heap memory for the next step: the resident size stays at the step's peak (which
the next step needs anyway) instead of bouncing.

The same two settings as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment,
but applied with ``mallopt`` from inside the process, so no launcher (torchrun, srun, Ray) has
to pass them. A no-op where the C library is not glibc (macOS, musl) and on GPU ranks (their
large tensors live in the CUDA caching allocator).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

M_TRIM_THRESHOLD = -1     # glibc's malloc.h
M_MMAP_MAX = -4
# mallopt takes an int, so the trim threshold tops out at ~2.1 GB of free heap: far above a CPU
# step's working set here, so in effect freed memory is kept (the environment variable, a size_t,
# could go higher; nothing on a CPU rank needs it)
TRIM_THRESHOLD_BYTES = 2**31 - 1


def _glibc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version       # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def keep_freed_blocks() -> str:
    """Apply the two settings to this process; returns a one-line account for the run log."""
    libc = _glibc()
    if libc is None:
        return "host allocator unchanged (the C library is not glibc)"
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return "host allocator unchanged (glibc's mallopt refused the settings)"
    return ("glibc malloc keeps large freed blocks for reuse (no mmap/munmap per step; "
            "train.keep_freed_host_memory=false turns it off)")
