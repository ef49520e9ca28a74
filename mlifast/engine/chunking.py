"""How many points one pass evaluates and how many of them run through the model together
(on the CPU, a cache-sized group), from the bytes one point takes and a memory budget."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from mlifast.engine.batches import to_device
from mlifast.multipoint.model import CHANNELS_LAST_DEVICES
from mlifast.multipoint.trees import tensors_in

CPU_BUDGET_FRACTION = 0.25
CUDA_BUDGET_FRACTION = 0.5
# On the CPU a pass runs its points in groups whose module outputs, at their peak (no_grad
# frees each when nothing refers to it), stay within this many bytes: element-wise layers
# then work in cache and allocations are reused, where K·B-row activations stream through
# memory and are mapped afresh for every layer; and each layer's Python and per-call costs
# are paid once a group, not once a point. Measured on the 2-core CI CPU (BENCHMARKS.md):
# - the MNIST MLP (8 MB at the peak a point at B = 1000) is about as fast at 1 to 8 points
#   a group and a third slower with all 50 at once;
# - a model keeping all 24 hidden states of a 512-wide MLP (12 MB a point at B = 256): 2
#   points a group 1.13 s, 5 points 1.55 s;
# - W2 at batch 16 (ResNet-20, 4.2 MB at the peak, 35.7 MB summed over its module outputs,
#   which the groups were sized by before): 1 point a group 5.5–5.9 s, 7 points 3.5–4.0 s,
#   16 points 3.2–3.8 s (the loop 4.6 s).
CPU_GROUP_BYTES = 32 << 20
# ... unless one of a point's module outputs alone fills a core's L2 cache (2 MiB on the CI
# CPU): then its layers stream through memory whatever the group, only the per-group costs
# (each layer's Python) are left to share, and its groups hold twice the bytes. W2 (4.2 MB
# the largest output, 16.8 MB at the peak): 2 → 4 points a group, median 2.32 → 2.26 s
# over 8 rounds (8 points: 2.5–2.9 s); W1 (4.1 MB): 4 → 8, 1.38–1.47 → 1.42–1.47 s; W5
# (2.0 MB), W2 at batch 16 (1.0 MB) and the hidden-state MLP (0.5 MB) unchanged.
CPU_STREAMING_OUTPUT_BYTES = 2 << 20
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


@dataclass(frozen=True)
class PointBytes:
    """Bytes one point takes on one batch.

    activations: every module output (an upper bound of what a group holds at once, as
        no_grad frees activations as it goes); held only while its group runs.
    live: the most bytes of module outputs alive at once (a tensor counted from the hook
        that first sees it to its collection; views counted again, and a pending result
        at its full size before it is computed).
    kept: what a pass keeps for each of its points whatever its groups: the model's
        output and the loss's temporaries of the same size until the batch ends, and each
        batch norm's (2, C) float64 sums and recomputed statistics until the pass ends.
    largest: the largest single module output.
    """

    activations: int
    kept: int
    live: int
    largest: int = 1


def bytes_per_point(fast, batch: Any, forward, device: torch.device, dtype=None) -> PointBytes:
    """PointBytes of `fast` for one point on `batch`, from one unchecked pass: images
    channels-last while the layout is undecided on a device where they may travel so (the
    forms the passes will most likely take; where the first-call check then keeps the
    model's own layout, its activations may be some 10 % larger), or in the model's own
    layout where that raises (a `.view` of an activation: LeNet). Linear layers give zeros
    of their shape uncomputed (PointContext.sizes_only), or their values where a model
    raises on zeros."""
    saved = fast.coords
    fast.set_coords(saved[:1])
    batch = to_device(batch, device, dtype)
    attempts = [(False, True), (False, False)]  # (images channels-last, sizes only)
    if fast.images_channels_last is None and device.type in CHANNELS_LAST_DEVICES:
        attempts.insert(0, (True, True))
    try:
        for layout, sizes_only in attempts[:-1]:
            try:
                return _one_pass_bytes(fast, batch, forward, layout, sizes_only)
            except Exception:  # noqa: BLE001 — the next attempt may not raise
                pass
        # (outside the handler: the failed attempt's activations are freed, no chained traceback)
        return _one_pass_bytes(fast, batch, forward, *attempts[-1])
    finally:
        fast.set_coords(saved)


def _one_pass_bytes(fast, batch: Any, forward, images_channels_last: bool, sizes_only: bool) -> PointBytes:
    activations, outputs, live, peak, largest = 0, 0, 0, 0, 0
    alive: set[int] = set()

    def freed(key: int, size: int) -> None:
        nonlocal live
        alive.discard(key)
        live -= size

    def count(module, _inputs, output):
        nonlocal activations, outputs, live, peak, largest
        for t in tensors_in(output):
            size = t.numel() * t.element_size()
            activations += size
            largest = max(largest, size)
            if id(t) not in alive:
                alive.add(id(t))
                live += size
                weakref.finalize(t, freed, id(t), size)
        peak = max(peak, live)
        if module is fast.model:
            outputs = sum(t.numel() * t.element_size() for t in tensors_in(output))

    # One unchecked pass (MultiPointModel.unchecked): the first-call check belongs to the
    # real passes, and a probe of one point would check a shape no pass uses.
    handles = [m.register_forward_hook(count) for m in fast.model.modules()]
    try:
        with torch.no_grad(), fast.unchecked(images_channels_last, sizes_only):
            forward(fast, batch)
    finally:
        for h in handles:
            h.remove()
    statistics = sum(m.inner.num_features * (2 * 8 + 2 * m.inner.running_mean.element_size())
                     for m in fast.norms if m.inner.running_mean is not None)
    return PointBytes(max(activations, 1), max(2 * outputs + statistics, 1), max(peak, 1), max(largest, 1))


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

    On a GPU a pass runs all its points at once (a GPU wants wide passes): the memory
    budget over one point's activations. On the CPU a pass runs them in groups of
    CPU_GROUP_BYTES (twice that where one output alone fills a core's cache,
    CPU_STREAMING_OUTPUT_BYTES) over the peak of one point's live module outputs, and at least the
    weights' bytes over its activations (each group reads the weights again), within half
    the budget; a pass holds one
    group's activations and what it keeps for each of its points (PointBytes.kept), so it
    takes every point the rest of the budget allows: each pass runs the first-call check
    of its number of points and reads the data again. `max_points_per_pass` caps it.
    """
    first = next((batch for batch in data if any(t.numel() for t in tensors_in(batch))), None)  # (not an empty one)
    if first is None or (max_points_per_pass and device.type != "cpu"):
        return max_points_per_pass or 1, None
    point = bytes_per_point(fast, first, forward, device, dtype)
    budget = memory_budget(device)
    if device.type != "cpu":
        return max_points_per_pass or int(max(1, budget // point.activations)), None
    group_bytes = CPU_GROUP_BYTES * (2 if point.largest >= CPU_STREAMING_OUTPUT_BYTES else 1)
    group = max(1, group_bytes // point.live, -(-weight_bytes(fast.space) // point.activations))
    group = int(max(1, min(group, budget // 2 // point.activations)))  # (half the budget: passes of many points)
    per_pass = int(max(1, (budget - group * point.activations) // point.kept))
    return min(per_pass, max_points_per_pass or per_pass), group
