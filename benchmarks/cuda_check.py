#!/usr/bin/env python
"""The CUDA op on a real GPU: correctness at random sizes, then a timed sweep.

    python benchmarks/cuda_check.py --json sweep.json      # run by benchmarks/gpu_check.sh

1. Correctness: `mlifast.ops.multipoint_linear` on CUDA against the float64 oracle, for
   every dtype (float64, float32, float32 with TF32 allowed, float16, bfloat16), shared and
   per-point inputs, with and without bias and bias directions, non-contiguous inputs,
   empty sizes, and every dispatch path (stacked, shared, per-point weights, fused), and the
   fused kernels alone (mlifast::_multipoint_linear_fused: tensor cores, SIMT) and each
   cuBLAS form alone (mlifast::_multipoint_linear_gemm_form) at every size; the error is
   max |y - y_ref| / max |y_ref|. Then gradcheck on CUDA in float64.
   Then a batch norm's passes (channel_moments, channel_affine) against a float64 loop,
   and timed against ATen's batch norm on W2's shapes.
   Exits non-zero on any failure, after printing every case.
2. Sweep: O = I = 4096 and 1024, one direction, K × R points × rows, float32 and bfloat16, mlifast
   against the two-GEMM form, a loop materialising each W_k (both cuBLAS), the op's
   grouped per-point form with each weight formed by a same-shape add, and one plain
   GEMM with a single weight, and the fused kernels alone; with the card's measured copy bandwidth and GEMM rates, so
   each time is also read as a fraction of the memory-bound floor (W and D once, x and y)
   or of the compute rate.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import mlifast  # noqa: E402
from mlifast.ops.linear import multipoint_linear_reference  # noqa: E402
import workloads as W  # noqa: E402

TOLERANCE = {"float64": 1e-12, "float32": 2e-5, "tf32": 5e-3, "float16": 5e-3, "bfloat16": 3e-2}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_case(g: torch.Generator, dtype: torch.dtype, k: int, r: int, i: int, o: int, j: int,
                shared: bool, bias: str, noncontiguous: bool):
    dev = "cuda"

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dev, dtype)

    if noncontiguous:  # the same values through a transposed view
        x = rnd(*((() if shared else (k,)) + (i, r))).transpose(-1, -2)
    else:
        x = rnd(*((() if shared else (k,)) + (r, i)))
    w = rnd(o, i, scale=1 / math.sqrt(max(i, 1)))
    d = rnd(j, o, i, scale=1 / math.sqrt(max(i, 1)))
    b = rnd(o, scale=0.1) if bias != "none" else None
    db = rnd(j, o, scale=0.1) if bias == "both" else None
    c = (torch.rand(k, j, generator=g, dtype=torch.float64) * 2 - 0.5).to(dev, torch.float32)
    return x, w, b, d, db, c


def check_case(name: str, args: tuple) -> float:
    """The worst relative error of the dispatched op, of the fused kernels alone and of
    each GEMM form alone (stacked; per-point weights, 3 points a GEMM)."""
    f64 = [t.double() if t is not None else None for t in args]
    ref = multipoint_linear_reference(*f64)
    err = 0.0
    gemm_form = torch.ops.mlifast._multipoint_linear_gemm_form
    ops = [mlifast.ops.multipoint_linear, torch.ops.mlifast._multipoint_linear_fused, lambda *a: gemm_form(*a, 0)]
    if args[0].dim() == 3:  # (per-point weights: each point's own rows)
        ops.append(lambda *a: gemm_form(*a, 3))
    for op in ops:
        y = op(*args)
        assert y.shape == ref.shape and y.dtype == args[0].dtype, (name, y.shape, ref.shape, y.dtype)
        if ref.numel():
            err = max(err, (y.double() - ref).abs().max().item() / (ref.abs().max().item() or 1.0))
    return err


def correctness(seed: int) -> bool:
    g = torch.Generator().manual_seed(seed)
    cases = []
    # Every dispatch path at least once, then random sizes.
    fixed = [(4, 16, 64, 64, 1, False), (70, 3, 33, 65, 2, False), (5, 300, 200, 130, 1, False),
             (9, 40, 96, 64, 3, True), (2, 40, 96, 64, 1, True), (1, 1, 1, 1, 1, False),
             (3, 17, 8, 100, 2, False), (2, 900, 64, 48, 1, False), (0, 5, 8, 8, 1, False), (3, 0, 8, 8, 1, False),
             (3, 5, 0, 8, 1, False), (3, 5, 8, 0, 1, False),
             # per-point weights over several batched GEMMs, the last one partial
             (70, 300, 40, 300, 1, False), (70, 260, 40, 280, 2, False), (40, 1000, 32, 256, 1, False),
             (3, 300, 0, 8, 1, False)]
    for _ in range(24):
        fixed.append((int(torch.randint(1, 70, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g)),
                      int(torch.randint(1, 400, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g)),
                      int(torch.randint(1, 4, (1,), generator=g)), bool(torch.rand(1, generator=g) < 0.3)))
    ok = True
    worst: dict[str, float] = {}
    for n, (k, r, i, o, j, shared) in enumerate(fixed):
        for dname, dtype in DTYPES.items():
            bias = ("none", "bias", "both")[n % 3]
            noncontig = n % 4 == 1
            torch.backends.cuda.matmul.allow_tf32 = dname == "tf32"
            name = f"{dname} K={k} R={r} I={i} O={o} J={j} shared={shared} bias={bias} noncontig={noncontig}"
            try:
                err = check_case(name, random_case(g, dtype, k, r, i, o, j, shared, bias, noncontig))
                good = err <= TOLERANCE[dname]
                worst[dname] = max(worst.get(dname, 0.0), err)
            except Exception as e:  # report every case, then fail
                err, good = float("nan"), False
                print(f"ERROR {name}: {type(e).__name__}: {e}")
            if not good:
                print(f"FAIL {name}: rel err {err:.2e} > {TOLERANCE[dname]:.0e}")
            ok &= good
    torch.backends.cuda.matmul.allow_tf32 = False
    print("worst relative error per dtype:", {k: f"{v:.1e}" for k, v in worst.items()})

    for shared in (False, True):
        x, w, b, d, db, c = random_case(g, torch.float64, 3, 5, 7, 6, 2, shared, "both", False)
        c = c.double()
        inputs = [t.requires_grad_() for t in (x, w, b, d, db, c)]
        try:
            good = torch.autograd.gradcheck(lambda *a: mlifast.ops.multipoint_linear(*a), inputs)
        except Exception as e:
            print(f"FAIL gradcheck shared={shared}: {e}")
            good = False
        print(f"gradcheck on CUDA, float64, shared={shared}: {'ok' if good else 'FAILED'}")
        ok &= bool(good)
    print("correctness:", "PASS" if ok else "FAIL")
    return ok


def channel_passes_correctness(seed: int) -> bool:
    """channel_moments and channel_affine on CUDA against a float64 loop over the points on
    the CPU: both layouts (rows of C values, runs of S), a strided input, K = 1 and 3,
    float32 and float64, a mean far from zero or a first value far from it, several
    slices a point, NaN; then W2's shapes timed against ATen's
    training-mode batch norm with the residual addition and ReLU (µs)."""
    g = torch.Generator().manual_seed(seed)
    layouts = {"channels-last": ((6, 5, 7, 3), lambda t: t.contiguous(memory_format=torch.channels_last)),
               "images": ((6, 5, 7, 3), lambda t: t.contiguous()),
               "rows": ((12, 300), lambda t: t.contiguous()),  # more channels than a block's threads
               "many rows": ((8190, 8), lambda t: t.contiguous()),  # several slices a point (K = 1, 3)
               "sequences": ((6, 4, 1000), lambda t: t.contiguous()),
               "many sequences": ((192, 4, 1000), lambda t: t.contiguous()),  # several slices a point
               "strided": ((6, 5, 7, 6), lambda t: t[..., ::2])}
    ok, worst = True, {}
    for (name, (shape, make)), dtype, points, offset in (
            (case, dtype, points, offset) for case in layouts.items() for dtype in (torch.float32, torch.float64)
            for points in (1, 3) for offset in (0.0, 1000.0)):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)
        x.view(-1)[0] = 1000.0 * 3 - offset  # (a first value far from the mean: no pivot to lose it)
        x = make(x.cuda())
        scale, shift = (torch.randn(points, shape[1], generator=g, dtype=torch.float64).to(dtype).cuda()
                        for _ in range(2))
        addend = torch.randn(*x.shape, generator=g, dtype=torch.float64).to(dtype).cuda()
        label = f"channel passes {name} {str(dtype)[6:]} K={points} offset={offset:g}"
        try:
            mean, var = mlifast.ops.channel_moments(x, points)
            y = mlifast.ops.channel_affine(x, scale, shift, addend, True)
            rows = x.double().cpu().unflatten(0, (points, -1))
            dims = [1, *range(3, rows.dim())]
            expected_mean = rows.mean(dim=dims)  # (two passes in float64: var_mean's is not exact enough)
            expected_var = (rows - expected_mean.reshape(points, 1, -1, *([1] * (rows.dim() - 3)))).square().mean(dim=dims)
            view = (points, 1, shape[1], *([1] * (x.dim() - 2)))
            expected_y = (rows * scale.double().cpu().reshape(view) + shift.double().cpu().reshape(view)).flatten(0, 1)
            expected_y = (expected_y + addend.double().cpu()).clamp_min(0)
            spread = expected_var.sqrt()  # (each channel against its own scale)
            err = max(((mean.double().cpu() - expected_mean).abs() / (expected_mean.abs() + spread)).max().item(),
                      ((var.double().cpu() - expected_var).abs() / expected_var).max().item(),
                      ((y.double().cpu() - expected_y).abs().max() / expected_y.abs().max()).item())
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            good = err <= tol and y.stride() == (x.stride() if name != "strided" else y.stride())
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
        except Exception as e:  # report every case, then fail
            err, good, tol = float("nan"), False, 0.0
            print(f"ERROR {label}: {type(e).__name__}: {e}")
        if not good:
            print(f"FAIL {label}: rel err {err:.2e} > {tol:.0e}")
        ok &= good
    x = torch.randn(6, 5, 7, 3, generator=g).cuda()
    x[2, 1, 3, 1] = float("nan")  # point 1 of 3, channel 1
    mean, var = mlifast.ops.channel_moments(x, 3)
    nan_ok = bool(mean[1, 1].isnan() and var[1, 1].isnan() and not mean[0].isnan().any())
    print(f"channel passes: worst relative error {({k: f'{v:.1e}' for k, v in worst.items()})}, "
          f"NaN {'kept' if nan_ok else 'LOST'}")
    ok &= nan_ok
    for shape in ((64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8), (3200, 16, 32, 32)):
        x, a = (torch.randn(*shape, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(2))
        c = shape[1]
        points = shape[0] // 64
        w, b, m, v = torch.rand(c, device="cuda"), torch.rand(c, device="cuda"), torch.zeros(c, device="cuda"), \
            torch.ones(c, device="cuda")
        aten = lambda: torch.relu(torch.nn.functional.batch_norm(x, m, v, w, b, True, 1.0, 1e-5) + a)  # noqa: E731

        def ours():
            mean, var = mlifast.ops.channel_moments(x, points)
            scale = torch.rsqrt(var + 1e-5) * w
            return mlifast.ops.channel_affine(x, scale, b - mean * scale, a, True)

        print(f"bn + add + relu {shape} channels-last, {points} point(s): ATen {time_call(aten) * 1e6:.0f} µs "
              f"(one point's statistics over all), mlifast {time_call(ours) * 1e6:.0f} µs")
    return ok


def time_call(fn, target_s: float = 0.02) -> float:
    """Median seconds per call over 3 timed groups (CUDA events), after warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    n = max(1, min(200, int(target_s / max(start.elapsed_time(end) / 1e3, 1e-6))))
    samples = []
    for _ in range(3):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(samples)


def ceilings() -> dict:
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB, far past L2
    dst = torch.empty_like(src)
    copy_s = time_call(lambda: dst.copy_(src))
    out = {"copy_GBps": 2 * src.numel() / copy_s / 1e9}  # bytes read + written
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False),
                              ("tf32", torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        out[f"gemm_{name}_TFLOPs"] = 2 * 8192**3 / time_call(lambda: a @ b) / 1e12
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def grouped_add(c: W.OpCase, sm_count: int) -> torch.Tensor:
    """The CUDA op's per-point form (points in groups of points_per_gemm, one baddbmm a
    group), each point's weight formed as `loop-materialise` forms it (a same-shape add
    with a host scalar, vectorised) instead of by one broadcasting addcmul for the group:
    the candidate where the op loses to `loop-materialise` (1024 rows a point,
    BENCHMARKS.md)."""
    tiles = -(-c.rows // 128) * -(-c.features // 128)
    group = max(1, min(-(-4 * sm_count // tiles), (256 << 20) // (c.features**2 * c.weight.element_size()), c.points))
    weights = c.weight.new_empty(group, c.features, c.features)
    y = c.weight.new_empty(c.points, c.rows, c.features)
    bias = c.bias + c.coeffs.to(c.bias.dtype) @ c.bias_dirs  # (K, O)
    for first in range(0, c.points, group):
        n = min(group, c.points - first)
        for i, ck in enumerate(c.coeffs[first:first + n, 0].tolist()):
            torch.add(c.weight, c.dirs[0], alpha=ck, out=weights[i])
        torch.baddbmm(bias[first:first + n].unsqueeze(1), c.x[first:first + n], weights[:n].transpose(1, 2),
                      out=y[first:first + n])
    return y


def sweep(features: int, ceil: dict, points: list, rows_per_point: list) -> list:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    for dname in ("bfloat16", "float32", "tf32"):
        dtype = DTYPES[dname]
        torch.backends.cuda.matmul.allow_tf32 = dname == "tf32"
        f = features
        weight = torch.randn(f, f, device="cuda", generator=g).div_(math.sqrt(f)).to(dtype)
        dirs = torch.randn(1, f, f, device="cuda", generator=g).div_(math.sqrt(f)).to(dtype)
        bias = torch.randn(f, device="cuda", generator=g).to(dtype)
        bias_dirs = torch.randn(1, f, device="cuda", generator=g).to(dtype)
        esize = weight.element_size()
        for k in points:
            for r in rows_per_point:
                x = torch.randn(k, r, f, device="cuda", generator=g).to(dtype)
                coeffs = torch.linspace(0, 1, k, device="cuda").unsqueeze(1)
                case = W.OpCase(k, r, f, x, weight, bias, dirs, bias_dirs, coeffs.to(dtype))
                fused_args = (x, weight, bias, dirs, bias_dirs, case.coeffs)
                impls = {"mlifast": lambda: W.op_mlifast(case),
                         "fused": lambda: torch.ops.mlifast._multipoint_linear_fused(*fused_args),
                         "two-GEMM": lambda: W.op_two_gemm(case),
                         "loop-materialise": lambda: W.op_loop_materialise(case),
                         "grouped-add": lambda: grouped_add(case, sm_count),
                         "dense-1W": lambda: W.op_dense_one_weight(case)}
                times = {name: time_call(fn) for name, fn in impls.items()}
                floor_bytes = esize * (2 * f * f + 2 * k * r * f)
                flops = 2.0 * k * r * f * f
                rate = ceil["gemm_bf16_TFLOPs" if dname == "bfloat16" else f"gemm_{'tf32' if dname == 'tf32' else 'fp32'}_TFLOPs"]
                t = times["mlifast"]
                row = {"dtype": dname, "K": k, "R": r, "features": f,
                       **{f"{n}_us": v * 1e6 for n, v in times.items()},
                       "mlifast_GBps": floor_bytes / t / 1e9,
                       "bandwidth_fraction": floor_bytes / t / 1e9 / ceil["copy_GBps"],
                       "mlifast_TFLOPs": flops / t / 1e12,
                       "compute_fraction": flops / t / 1e12 / rate,
                       "best_other_over_mlifast": min(v for n, v in times.items() if n not in ("mlifast", "fused", "grouped-add", "dense-1W")) / t}
                rows.append(row)
                print(f"{dname:9s} O=I={f} K={k:3d} R={r:5d}  " + "  ".join(f"{n} {v * 1e6:9.1f}us" for n, v in times.items())
                      + f"  | {row['mlifast_GBps']:7.0f} GB/s ({row['bandwidth_fraction']:.0%} of copy)"
                      f"  {row['mlifast_TFLOPs']:6.1f} TFLOP/s ({row['compute_fraction']:.0%} of GEMM)"
                      f"  best other / mlifast {row['best_other_over_mlifast']:.2f}", flush=True)
                del x, case, fused_args
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def markdown(path: str) -> str:
    """The sweep of a --json file as a BENCHMARKS.md table."""
    with open(path) as f:
        res = json.load(f)
    names = [n for n in ("mlifast", "fused", "two-GEMM", "loop-materialise", "grouped-add", "dense-1W")
             if f"{n}_us" in res["sweep"][0]]
    out = [f"{res['device']}, torch {res['torch']}; ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in res["ceilings"].items()),
           "", "| dtype | O = I | K | R | " + " | ".join(f"{n} µs" for n in names)
           + " | best cuBLAS form / mlifast | mlifast GB/s (% of copy) | mlifast TFLOP/s (% of GEMM) |",
           "|---|---:|---:|---:|" + "---:|" * (len(names) + 3)]
    for r in res["sweep"]:
        out.append(f"| {r['dtype']} | {r['features']} | {r['K']} | {r['R']} | " + " | ".join(f"{r[n + '_us']:.0f}" for n in names)
                   + f" | {r['best_other_over_mlifast']:.2f} | {r['mlifast_GBps']:.0f} ({r['bandwidth_fraction']:.0%})"
                   f" | {r['mlifast_TFLOPs']:.1f} ({r['compute_fraction']:.0%}) |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the ceilings and the sweep here")
    p.add_argument("--markdown", metavar="JSON", help="only print the sweep of an earlier --json as a table")
    p.add_argument("--features", default="4096,1024", help="O = I values of the sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--points", default="4,16,64", help="K values of the sweep")
    p.add_argument("--rows", default="1,16,256,1024", help="R values (rows per point) of the sweep")
    args = p.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    if not torch.cuda.is_available():
        p.error("no CUDA device")
    info = mlifast.info()
    print(json.dumps(info, default=str))
    if info["ops"]["multipoint_linear"]["cuda"] != "cuda":
        print("FAIL: the CUDA kernels are not loaded; this would test the reference against itself")
        return 1
    ok = correctness(args.seed)
    if info["ops"]["channel_moments"]["cuda"] != "cuda":
        print("FAIL: the channel passes' CUDA kernels are not loaded")
        ok = False
    else:
        ok &= channel_passes_correctness(args.seed)
    ceil = ceilings()
    print("ceilings:", {k: round(v, 1) for k, v in ceil.items()})
    rows = [row for f in args.features.split(",")
            for row in sweep(int(f), ceil, [int(v) for v in args.points.split(",")],
                             [int(v) for v in args.rows.split(",")])]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "ceilings": ceil, "sweep": rows, "correct": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
