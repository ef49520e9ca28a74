#!/usr/bin/env python
"""Where a convolution's per-point form overtakes its stacked form on the CPU.

    python benchmarks/conv_crossover.py

For K_g points (a group) of B images each, float32, one direction, a 3×3
convolution: the per-point form (each point's weight W0 + c_k·D, one call per point, as
`layers.ConvRule`) against the stacked form (the layer at W0 and at D over all rows, then
the per-point combine, as `layers.AffineInParamsRule`). ConvRule switches forms at
PER_POINT_MIN_POSITIONS input positions (images × height × width) per point.
"""
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    torch.manual_seed(0)
    print("K_g    B   C   H=W  positions/point | per-point µs | stacked µs | stacked / per-point")
    for points in (4, 16):
        for images in (1, 4, 16):
            for channels, side in ((16, 8), (16, 32), (64, 8)):
                x = torch.randn(points * images, channels, side, side)
                w0, d = torch.randn(channels, channels, 3, 3), torch.randn(channels, channels, 3, 3)
                c = torch.rand(points, 1)

                def per_point():
                    weights = torch.addmm(w0.reshape(1, -1), c, d.reshape(1, -1)).reshape(points, *w0.shape)
                    rows = x.unflatten(0, (points, images)).unbind(0)
                    return torch.cat([F.conv2d(r, weights[k], None, 1, 1) for k, r in enumerate(rows)])

                def stacked():
                    y0 = F.conv2d(x, w0, None, 1, 1).unflatten(0, (points, images))
                    y1 = F.conv2d(x, d, None, 1, 1).unflatten(0, (points, images))
                    return (y0 + c.view(points, 1, 1, 1, 1) * y1).flatten(0, 1)

                a, s = per_call_us(per_point), per_call_us(stacked)
                print(f"{points:3d} {images:4d} {channels:3d} {side:5d} {images * side * side:16d} | "
                      f"{a:12.0f} | {s:10.0f} | {s / a:6.2f}")


if __name__ == "__main__":
    main()
