"""A training-mode batch norm with the residual addition and ReLU after it: ATen against
mlifast's two passes (channel_moments, then channel_affine with the addition and the ReLU).

    python benchmarks/batch_norm_passes.py [--layout channels-last|contiguous] [--rounds 15]

One point's rows of W2's three ResNet-20 stages (64 float32 images of 16 × 32 × 32,
32 × 16 × 16 and 64 × 8 × 8), the CPU. Each row of the table: the median over `rounds` of
the mean of 20 calls, interleaved, in µs; under `allocator.freed_memory_kept`, as
`evaluate` runs (freed memory reused, no page faults).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from mlifast.engine.allocator import freed_memory_kept
from mlifast.ops import channel_affine, channel_moments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import per_call_seconds  # noqa: E402

SHAPES = ((64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8))


def median_us(cases: dict, rounds: int, calls: int = 20) -> dict:
    return {name: statistics.median(t) * 1e6 for name, t in per_call_seconds(cases, rounds, calls).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", default="channels-last", choices=("channels-last", "contiguous"))
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    layout = torch.channels_last if args.layout == "channels-last" else torch.contiguous_format
    print(f"{args.layout}, float32, {torch.get_num_threads()} threads; µs per call")
    print(f"{'shape':>18} | {'ATen bn+relu':>12} {'mlifast':>8} | {'ATen bn+add+relu':>16} {'mlifast':>8}")
    with freed_memory_kept(torch.device("cpu")), torch.no_grad():
        for shape in SHAPES:
            g = torch.Generator().manual_seed(0)
            x, addend = (torch.randn(*shape, generator=g).contiguous(memory_format=layout) for _ in range(2))
            c = shape[1]
            weight, bias = torch.rand(c, generator=g), torch.rand(c, generator=g)
            mean, var = torch.zeros(c), torch.ones(c)

            def ours(added):
                m, v = channel_moments(x, 1)
                scale = torch.rsqrt(v + 1e-5) * weight
                return channel_affine(x, scale, bias - m * scale, added, True)

            t = median_us({
                "aten": lambda: F.relu(F.batch_norm(x, mean, var, weight, bias, True, 1.0, 1e-5)),
                "ours": lambda: ours(None),
                "aten+add": lambda: F.relu(F.batch_norm(x, mean, var, weight, bias, True, 1.0, 1e-5) + addend),
                "ours+add": lambda: ours(addend),
            }, args.rounds)
            print(f"{str(shape):>18} | {t['aten']:12.0f} {t['ours']:8.0f} | {t['aten+add']:16.0f} {t['ours+add']:8.0f}")


if __name__ == "__main__":
    main()
