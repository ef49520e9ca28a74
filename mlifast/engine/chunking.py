"""How many points one pass evaluates: the memory budget over one point's activations."""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import Tensor

from mlifast.engine.batches import to_device

CPU_BUDGET_FRACTION = 0.25
CUDA_BUDGET_FRACTION = 0.5


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


def points_per_pass(fast, data: Iterable, forward, device: torch.device, dtype=None) -> int:
    first = next(iter(data), None)
    if first is None:
        return 1
    per_point = activation_bytes_per_point(fast, first, forward, device, dtype)
    return int(max(1, memory_budget(device) // per_point))
