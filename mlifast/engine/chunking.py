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
# ... but every group reads all the weights again (each moving layer's origin and its J
# directions): a group is made at least as large as that traffic over one point's
# activations, so that what keeping its activations in cache saves can outweigh it. On W3 (a
# 319M-parameter transformer, 2.55 GB of origin and direction, 14 MB of activations a point
# at 8 token rows) 4 points a group took 1.35 s a pass of 16, one group of 16 0.72 s; the
# small models' groups (kilo- to megabytes of weights) are unchanged.


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
    # One unchecked pass (MultiPointModel.unchecked): the first-call check belongs to the
    # real passes, and a probe of one point would check a shape no pass uses.
    handles = [m.register_forward_hook(count) for m in fast.model.modules()]
    try:
        with torch.no_grad(), fast.unchecked():
            forward(fast, batch)
    finally:
        for h in handles:
            h.remove()
        fast.set_coords(saved)
    return max(total, 1)


def weight_bytes(space) -> int:
    """Bytes one pass over the model reads from the space: every floating origin tensor,
    and each moving one's J directions."""
    total = 0
    for key, origin in space.origin.items():
        if origin.is_floating_point():
            moving = not space.is_frozen(key)
            total += origin.numel() * origin.element_size() * (1 + (space.num_directions if moving else 0))
    return total


def plan(fast, data: Iterable, forward, device: torch.device, dtype=None,
         max_points_per_pass: int | None = None) -> tuple[int, int | None]:
    """(points per pass, points per group within a pass; None: all at once).

    Points per pass: `max_points_per_pass`, else the memory budget over one point's
    activations. Points per group: on the CPU, CPU_GROUP_BYTES over one point's
    activations, and at least the weights' bytes over them (each group reads the weights
    again), at least 1; elsewhere all points at once (a GPU wants wide passes).
    """
    first = next(iter(data), None)
    if first is None or (max_points_per_pass and device.type != "cpu"):
        return max_points_per_pass or 1, None
    per_point = activation_bytes_per_point(fast, first, forward, device, dtype)
    per_pass = max_points_per_pass or int(max(1, memory_budget(device) // per_point))
    if device.type != "cpu":
        return per_pass, None
    return per_pass, int(max(1, CPU_GROUP_BYTES // per_point, -(-weight_bytes(fast.space) // per_point)))
