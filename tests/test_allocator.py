"""Freed memory kept during an evaluation (glibc): passes reuse pages instead of faulting
fresh ones in, whatever thresholds the process had."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import mlifast
from mlifast.engine import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only")

# A process whose glibc thresholds are at their initial 128 KiB, then a churn of tensors
# of SIZE floats (what a pass through a network does per layer): the page faults of each step.
SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from mlifast.engine import allocator

    size = int(sys.argv[1])

    libc = allocator._glibc()
    libc.mallopt(allocator.M_MMAP_THRESHOLD, 128 << 10)
    libc.mallopt(allocator.M_TRIM_THRESHOLD, 128 << 10)

    def faults(step):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def churn():
        for _ in range(4):
            tensors = [torch.ones(size) for _ in range(8)]
            del tensors

    print(faults(churn))
    with allocator.freed_memory_kept(torch.device("cpu")):
        churn()
        print(faults(churn))
    with allocator.freed_memory_kept(torch.device("cpu")):  # the next call
        print(faults(churn))
""")


@pytest.mark.parametrize("mib", [1, 4, 40])  # (40: over the largest mmap threshold glibc allows)
def test_freed_memory_is_reused_inside_the_block_and_by_the_next(mib):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(mib << 18)], capture_output=True, text=True,
                         check=True).stdout
    outside, inside, next_block = map(int, out.split())
    pages = 4 * 8 * (mib << 20) // 4096  # the churn's bytes in 4 KiB pages
    assert outside >= pages // 2, out  # fresh pages for every tensor
    assert inside < pages // 50, out
    assert next_block < pages // 50, out


class RecordingLibc:
    def __init__(self, free_bytes=0):
        self.calls = []
        self.free_bytes = free_bytes

    def mallopt(self, option, value):
        self.calls.append(("mallopt", option, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1

    def mallinfo2(self):
        return allocator._MallInfo2(fordblks=self.free_bytes)


@pytest.mark.parametrize("free_bytes", [allocator.KEPT_BYTES, allocator.KEPT_BYTES + 1])
def test_evaluate_keeps_freed_memory_for_the_whole_call_and_hands_back_the_excess_once(monkeypatch, free_bytes):
    libc = RecordingLibc(free_bytes)
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    space = mlifast.Line(net.state_dict(), {k: v + 0.1 for k, v in net.state_dict().items()})
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]

    def evaluate_inside_a_pass(model, batch):  # an evaluate nested in another's pass
        if not libc.calls or libc.calls[-1][0] != "nested":
            with allocator.freed_memory_kept(torch.device("cpu")):
                libc.calls.append(("nested",))
        return model(batch[0]), batch[1]

    mlifast.evaluate(net, space, data, coords=3, metrics=(), progress=False, forward=evaluate_inside_a_pass)
    assert libc.calls[:3] == [("mallopt", allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD),
                              ("mallopt", allocator.M_TRIM_THRESHOLD, allocator.KEPT_BYTES),
                              ("mallopt", allocator.M_MMAP_MAX, 0)]
    on_leaving = [("mallopt", allocator.M_MMAP_MAX, allocator.DEFAULT_MMAP_MAX)]
    if free_bytes > allocator.KEPT_BYTES:
        on_leaving.append(("malloc_trim", allocator.KEPT_BYTES))
    assert libc.calls[-len(on_leaving):] == on_leaving
    assert [c for c in libc.calls if c[0] != "nested"] == libc.calls[:3] + on_leaving
