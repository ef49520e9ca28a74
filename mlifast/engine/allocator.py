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
LayerNorm 5× slower on 32 MiB than on 30). On leaving, mmap is allowed again (glibc's
default count) and the mmap threshold stays at glibc's own dynamic maximum (MMAP_THRESHOLD,
which a long-running process reaches once it frees a 32 MiB block); what the call freed
stays with the process for the next call where it is at most KEPT_BYTES, as PyTorch's CUDA
allocator keeps its blocks: any later allocation of the process reuses it, and a call's
heap is bounded by its activation budget (`engine/chunking.py`). Where more is free,
malloc_trim hands back all of it but KEPT_BYTES at the top of the heap (the free pages
below a block still in use go too), as it does on every call before glibc 2.33 (no
mallinfo2 to tell). The trim threshold stays at KEPT_BYTES for the rest of the process:
glibc hands back the top of the heap whenever more than that is free there.
`ctypes.CDLL(None).malloc_trim(0)` hands back all of it. Handing it all back on every call
made each call fault its whole heap in again, which on a small data set costs as much as a
fifth of the call: W3 (one batch) 316k page faults and 1.59–1.66 s a call against none and
1.32–1.39 s; ConvNeXt on 2 batches 34k and 0.35 against 0.31 s (the loop of the same points
0.27 s, its heap under glibc's 64 MiB). Other C libraries, and other devices, are left as
they are.
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
KEPT_BYTES = 2**31 - 1  # as much as mallopt's int takes
_depth = 0  # blocks open, in every thread
_lock = threading.Lock()


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+)
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        if hasattr(libc, "mallinfo2"):
            libc.mallinfo2.restype = _MallInfo2
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


def _free_bytes(libc) -> int | None:
    """Bytes free in all of malloc's arenas (mallinfo2), or None before glibc 2.33."""
    return libc.mallinfo2().fordblks if hasattr(libc, "mallinfo2") else None


@contextmanager
def freed_memory_kept(device: torch.device) -> Iterator[None]:
    """Keep memory freed inside the block for reuse (CPU, glibc); on leaving, hand back
    what is free beyond KEPT_BYTES. Nested or concurrent blocks (other threads) act as one,
    from the first to open to the last to close."""
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
                free = _free_bytes(libc)
                if free is None or free > KEPT_BYTES:
                    libc.malloc_trim(KEPT_BYTES)
