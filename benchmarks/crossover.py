"""Where the fused linear op's CPU forms cross over.

    python benchmarks/crossover.py

Times mlifast.ops.multipoint_linear against the two-GEMM form and the per-point loop for
K=16 points, 1024×1024 weights, one direction, float32, as the rows per point grow; the
kernel takes the stacked form below kFormedWeightMinRows, weights formed in registers up to
kFormedWeightMaxRows and per-point weights above (csrc/cpu/multipoint_linear.cpp).
"""
import torch, time
from mlifast.ops import multipoint_linear
torch.manual_seed(0)
I = O = 1024; K = 16
w = torch.randn(O, I); d = torch.randn(1, O, I); b = torch.randn(O); c = torch.rand(K, 1)
def tm(f, n=5):
    f(); t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e3
for R in (1, 3, 4, 8, 16, 32, 64, 96, 127, 128, 256):
    x = torch.randn(K, R, I)
    t_op = tm(lambda: multipoint_linear(x, w, b, d, None, c))
    two = lambda: (x @ w.t()) + c[:, :, None] * (x @ d[0].t()) + b
    t_two = tm(two)
    def loop():
        for k in range(K):
            torch.addmm(b, x[k], (w + c[k, 0] * d[0]).t())
    t_loop = tm(loop)
    print(f"R={R:4d} op {t_op:8.2f} ms  two-GEMM {t_two:8.2f}  loop {t_loop:8.2f}")
