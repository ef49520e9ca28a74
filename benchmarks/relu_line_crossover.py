"""From how many points a line relu_line_linear beats one GEMM per point.

    python benchmarks/relu_line_crossover.py [--rows 64,1000] [--features 1024] [--slope 0.01]

Times the layer after an MLP's first ReLU at K points of a line, float32, best of 3:
mlifast.ops.relu_line_linear (one GEMM at the first point plus the units that switch)
against the previous path (the ReLU'd combine of the first layer's products, then
multipoint_linear's per-point GEMMs). The multi-point model uses the op from
MIN_POINTS_PER_LINE points a line (mlifast/multipoint/relu_line.py). With --slope, after a
LeakyReLU of that negative slope instead of the ReLU.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mlifast.ops import multipoint_combine, multipoint_linear, relu_line_linear


def best_ms(fn, rounds: int = 3) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="64,1000", help="rows per point, comma-separated")
    p.add_argument("--features", type=int, default=1024, help="hidden units in and out")
    p.add_argument("--points", default="2,4,6,8,12,50", help="K, comma-separated")
    p.add_argument("--slope", type=float, default=0.0, help="the first activation's negative slope (0: ReLU)")
    args = p.parse_args()
    slope = args.slope
    g = torch.Generator().manual_seed(0)
    f = args.features
    for rows in map(int, args.rows.split(",")):
        a, e = torch.randn(rows, f, generator=g), torch.randn(rows, f, generator=g)
        w, d = torch.randn(f, f, generator=g) / f**0.5, torch.randn(f, f, generator=g) / f**0.5
        b, db = torch.randn(f, generator=g), torch.randn(f, generator=g)
        for k in map(int, args.points.split(",")):
            c = torch.linspace(0, 1, k)
            out = torch.empty(k, rows, f)
            line = best_ms(lambda: relu_line_linear(a, e, w, d, b, db, c, True, slope, out=out))

            def per_point():
                h = multipoint_combine(a, e.unsqueeze(1), None, None, c[:, None], slope == 0)
                h = F.leaky_relu(h, slope, inplace=True) if slope else h
                return multipoint_linear(h, w, b, d[None], db[None], c[:, None], True)

            dense = best_ms(per_point)
            print(f"rows {rows:5d}  K {k:3d}  relu_line_linear {line:7.1f} ms  per-point GEMMs {dense:7.1f} ms"
                  f"  ratio {line / dense:.2f}")


if __name__ == "__main__":
    main()
