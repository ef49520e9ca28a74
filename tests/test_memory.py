"""Evaluating K points never holds K copies of the weights (allocations counted, not timed)."""
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
