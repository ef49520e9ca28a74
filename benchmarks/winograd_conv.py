"""A 3×3, stride-1 convolution of float32 images, alone and with the residual addition and
ReLU after it: ATen (oneDNN's direct convolution) against mlifast's `winograd_conv3x3`.

    python benchmarks/winograd_conv.py [--shapes 64x16x32x32,8x128x14x14] [--repeats 5] [--calls 100] [--threads 2]

Shapes are N×C×H×W (C_out = C, padding 1); by default W2's three ResNet-20 stages (64
images of 16 × 32 × 32, 32 × 16 × 16 and 64 × 8 × 8). Inputs and weights channels-last, the
CPU. Each time: the best over `repeats` rounds of the mean of `calls` calls, interleaved, in
ms; under `allocator.freed_memory_kept`, as `evaluate` runs. Error: max |y − y64| / max |y64|
against a float64 convolution, weights scaled like a trained net's (randn / √(9·C)).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from mlifast.engine.allocator import freed_memory_kept
from mlifast.ops import winograd_conv3x3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import cpu_model, per_call_seconds  # noqa: E402

SHAPES = ((64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8))


def best_ms(cases: dict, repeats: int, calls: int) -> dict:
    return {name: min(t) * 1e3 for name, t in per_call_seconds(cases, repeats, calls).items()}


def relative_error(y: torch.Tensor, y64: torch.Tensor) -> float:
    return ((y.double() - y64).abs().max() / y64.abs().max()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                   help="comma-separated NxCxHxW, e.g. 64x16x32x32,8x128x14x14")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes.split(",") if s]
    torch.set_num_threads(args.threads)
    cl = torch.channels_last
    print(f"{cpu_model()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"float32, channels-last; ms per call, best of {args.repeats} × {args.calls} calls\n")
    print("| shape (N×C×H×W) | ATen | winograd | ratio | ATen+add+relu | winograd+add+relu | ratio "
          "| error ATen | error winograd |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    with freed_memory_kept(torch.device("cpu")), torch.no_grad():
        for n, c, h, w in shapes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=cl)
            weight = (torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5).contiguous(memory_format=cl)
            bias = 0.1 * torch.randn(c, generator=g)
            addend = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=cl)
            t = best_ms({
                "aten": lambda: torch.conv2d(x, weight, bias, padding=1),
                "ours": lambda: winograd_conv3x3(x, weight, bias, (1, 1)),
                "aten+": lambda: torch.conv2d(x, weight, bias, padding=1).add_(addend).relu_(),
                "ours+": lambda: winograd_conv3x3(x, weight, bias, (1, 1), addend, True),
            }, args.repeats, args.calls)
            y64 = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
            e_aten = relative_error(torch.conv2d(x, weight, bias, padding=1), y64)
            e_ours = relative_error(winograd_conv3x3(x, weight, bias, (1, 1)), y64)
            print(f"| {n}×{c}×{h}×{w} | {t['aten']:.3f} | {t['ours']:.3f} | {t['aten'] / t['ours']:.2f} "
                  f"| {t['aten+']:.3f} | {t['ours+']:.3f} | {t['aten+'] / t['ours+']:.2f} "
                  f"| {e_aten:.1e} | {e_ours:.1e} |")


if __name__ == "__main__":
    main()
