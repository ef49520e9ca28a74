"""Freed memory kept for reuse while an evaluation runs on the CPU (glibc's malloc).

glibc serves a request above its mmap threshold with fresh pages and hands freed memory
back to the kernel once the top of its heap passes its trim threshold. Both thresholds
start at 128 KiB and only rise as the process frees large blocks, so how often a pass's
megabyte-sized activations land on fresh pages depends on the process's history. Every
fresh 4 KiB page costs a page fault on first touch (about 1.3 µs here). On W2 (ResNet-20,
50 points) this was 2.6 million faults, 3 s of a 7.7 s call, with the same code running
in 4.7 s in a process whose thresholds had risen (BENCHMARKS.md, "Page faults").

`freed_memory_kept` fixes the thresholds for the call: requests up to MMAP_THRESHOLD come
from the heap, and the heap keeps up to KEPT_BYTES of freed memory, so the passes of one
call reuse the same pages. MMAP_THRESHOLD is the most glibc lets a process set, so larger
requests are served from the heap too by turning mmap off for the call (M_MMAP_MAX 0):
else every activation of 32 MiB or more was mapped and faulted in afresh (a ViT of 64
tokens at 6 points a group: 600k page faults a call against the loop's 1.3k, GELU and
LayerNorm 5× slower on 32 MiB than on 30). On leaving, the heap is trimmed (the call holds
no memory afterwards), mmap is allowed again (glibc's default count) and the thresholds
are left at glibc's own dynamic maxima (MMAP_THRESHOLD and twice it), which a
long-running process reaches once it frees a 32 MiB block. Other C libraries, and other
devices, are left as they are.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
DEFAULT_MMAP_MAX = 65536  # glibc's DEFAULT_MMAP_MAX
KEPT_BYTES = 2**31 - 1  # while a call runs: as much as mallopt's int takes
_depth = 0  # blocks open, in every thread
_lock = threading.Lock()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


@contextmanager
def freed_memory_kept(device: torch.device) -> Iterator[None]:
    """Keep memory freed inside the block for reuse (CPU, glibc); trim it on leaving.
    Nested or concurrent blocks (other threads) act as one, from the first to open to
    the last to close."""
    global _depth
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES)
            libc.mallopt(M_MMAP_MAX, 0)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
                libc.malloc_trim(0)
