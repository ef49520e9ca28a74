"""How many points one pass evaluates (the memory budget over one point's activations), and
how many of them run through the model together (on the CPU, a cache-sized group)."""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import Tensor

from mlifast.engine.batches import to_device

CPU_BUDGET_FRACTION = 0.25
CUDA_BUDGET_FRACTION = 0.5
# On the CPU a pass runs its points in groups whose activations (the sum of module outputs
# of one batch) stay within this many bytes: element-wise layers then work in cache and
# allocations are reused, where K·B-row activations stream through memory and are mapped
# afresh for every layer. Measured on the 2-core CI CPU (BENCHMARKS.md): the MNIST MLP
# (19 MB a point at B = 1000) is about as fast at 1 to 8 points a group and a third
# slower with all 50 at once; at B = 500 (9 MB a point) 6 points a group beat 1–3 by ~10 %.
CPU_GROUP_BYTES = 64 << 20


def memory_budget(device: torch.device) -> int:
    """Bytes of activations one pass may hold: a fraction of free memory on the device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_BUDGET_FRACTION)
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 2**18
    return int(pages * os.sysconf("SC_PAGE_SIZE") * CPU_BUDGET_FRACTION)


def activation_bytes_per_point(fast, batch: Any, forward, device: torch.device, dtype=None) -> int:
    """Bytes of every module output for one point on `batch` (an upper bound of what a
    pass holds at once, since no_grad frees activations as it goes)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        stack = [output]
        while stack:
            o = stack.pop()
            if isinstance(o, Tensor):
                total += o.numel() * o.element_size()
            elif isinstance(o, (tuple, list)):
                stack.extend(o)
            elif isinstance(o, dict):
                stack.extend(o.values())

    saved = fast.coords
    fast.set_coords(saved[:1])
    batch = to_device(batch, device, dtype)
    with torch.no_grad():
        forward(fast, batch)  # the first call of a shape runs extra checking passes: not counted
    handles = [m.register_forward_hook(count) for m in fast.model.modules()]
    try:
        with torch.no_grad():
            forward(fast, batch)
    finally:
        for h in handles:
            h.remove()
        fast.set_coords(saved)
    return max(total, 1)


def plan(fast, data: Iterable, forward, device: torch.device, dtype=None,
         max_points_per_pass: int | None = None) -> tuple[int, int | None]:
    """(points per pass, points per group within a pass; None: all at once).

    Points per pass: `max_points_per_pass`, else the memory budget over one point's
    activations. Points per group: on the CPU, CPU_GROUP_BYTES over one point's
    activations (at least 1); elsewhere all points at once (a GPU wants wide passes).
    """
    first = next(iter(data), None)
    if first is None or (max_points_per_pass and device.type != "cpu"):
        return max_points_per_pass or 1, None
    per_point = activation_bytes_per_point(fast, first, forward, device, dtype)
    per_pass = max_points_per_pass or int(max(1, memory_budget(device) // per_point))
    group = int(max(1, CPU_GROUP_BYTES // per_point)) if device.type == "cpu" else None
    return per_pass, group
