"""Evaluating K points never holds K copies of the weights (allocations counted, not timed)."""
import gc

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfile

import mlifast


def peak_bytes(fn) -> int:
    """Peak of live CPU allocator bytes while fn runs, from the profiler's allocation timeline
    (it sees allocations inside compiled kernels too)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        live += size if action.name == "CREATE" else -size if action.name == "DESTROY" else 0
        peak = max(peak, live)
    return peak


def mlp():
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


@pytest.mark.parametrize("rows_per_point", [2, 70])  # the stacked and the per-point-weight kernels
def test_64_points_allocate_less_than_three_parameter_copies(rows_per_point):
    torch.manual_seed(0)
    a, b = mlp(), mlp()
    param_bytes = sum(p.numel() * p.element_size() for p in a.parameters())
    fast = mlifast.interpolate(a, mlifast.Line(a, b), 64)
    x = torch.randn(rows_per_point, 256)
    with torch.no_grad():
        fast(x)  # warm up lazy initialisation
        peak = peak_bytes(lambda: fast(x))
    activations = 3 * 64 * rows_per_point * 512 * 4  # a layer's input, output and its GEMM temporaries
    assert peak < 3 * param_bytes + activations, (peak, param_bytes, activations)
    # The oracle's way — K state dicts — holds K copies: the measure can see that.
    line = mlifast.Line(a, b)
    materialised = peak_bytes(lambda: [line.state_at(c) for c in torch.linspace(0, 1, 8).tolist()])
    assert materialised > 7 * param_bytes


def _module_garbage(fn) -> list:
    """The modules that fn leaves for Python's cycle collector (unreachable, yet not freed
    when the last reference went): with the collector off, freed memory comes back only
    by reference counting."""
    gc.collect()
    gc.disable()
    try:
        fn()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, nn.Module)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_what_a_call_made_is_freed_on_return():
    # A call's copies of the model hold tensors of their own (relu_line's outputs, each
    # point's recurrent weights): found only by the collector, they outlived calls.
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2))
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,)))]
    assert _module_garbage(lambda: mlifast.evaluate(a, mlifast.Line(a, b), data, coords=4, progress=False)) == []

    def interpolated():
        fast = mlifast.interpolate(a, mlifast.Line(a, b), 4)
        fast(torch.randn(5, 6))
    assert _module_garbage(interpolated) == []
