#!/usr/bin/env python
"""mlifast against its baselines, measured in the same run, interleaved.

    python benchmarks/compare.py                    # full sizes (about 16 minutes on 2 cores, W3 about 6)
    python benchmarks/compare.py --quick            # CI correctness smoke test (< 60 s)
    python benchmarks/compare.py --workloads W1,W4 --device cuda --json out.json
    python benchmarks/compare.py --mlifast-from /tmp/snap   # a snapshot of one commit (see BENCHMARKS.md)

For every workload it first checks that mlifast's losses agree with the loop baseline's
(1e-4 relative at float32; the op sweep against a float64 oracle) and exits non-zero if
not; then it times every implementation round-robin (the order rotates each round) and
prints one table: the median time, the ratio to mlifast (>1: mlifast is faster),
achieved GFLOP/s, the time against the workload's FLOP floor (the fused algorithm's
FLOPs at this machine's measured float32 GEMM rate, or, where larger, its compulsory
memory traffic — the weights and directions read once per batch — at the measured memory
copy rate), and peak memory (for W3 also in copies of the weights).

Peak memory on CPU: each implementation's first (checking) run happens in a fresh
subprocess, which reports the growth of its ru_maxrss over the set-up (tracemalloc does
not see torch's allocations). On CUDA: torch.cuda.max_memory_allocated over that run.
--quick skips it (subprocess start-ups would not fit in the CI budget).

Every implementation runs under the glibc malloc thresholds that mlifast.evaluate leaves
(glibc's dynamic maxima), set once at the start: otherwise a baseline timed before
mlifast's first call would run under this process's earlier, lower thresholds and fault
fresh pages in for every activation (BENCHMARKS.md, "Page faults").

Workloads (workloads.py): W1 MNIST MLP line, W2 ResNet-20 + BN (bn="recompute"), W3 a
319M-parameter decoder-only transformer at K = 16 points of a line (1×8 tokens per point
on the CPU, 4×64 with --device cuda), W4 the fused linear op swept over K×R, W5 a 21×21
plane on W1's model.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _use_mlifast_from(argv: list) -> None:
    """--mlifast-from DIR: measure the mlifast package in DIR (e.g. a `git archive` snapshot of
    one commit with the built _C copied in) instead of the installed one, even an editable
    install, whose import hook would otherwise win over sys.path."""
    if "--mlifast-from" not in argv or argv.index("--mlifast-from") + 1 >= len(argv):
        return
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "editable" not in type(f).__module__ and "skbc" not in type(f).__module__]
    sys.path.insert(0, os.path.abspath(argv[argv.index("--mlifast-from") + 1]))


_use_mlifast_from(sys.argv)

import torch  # noqa: E402

import mlifast  # noqa: E402
import workloads as W  # noqa: E402

# mlifast vs the loop, float64 sums of a forward in float32 (or, with --dtype, bfloat16: an
# 8-bit mantissa, and the loop rounds each point's weights to it where mlifast does not)
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 3e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OP_RTOL = 1e-4  # fused op vs the float64 oracle, relative to max |y|
ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5")


# ----------------------------------------------------------------------------- timing helpers


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def per_call_seconds(cases: dict, rounds: int, calls: int) -> dict:
    """{name: [seconds a call, one mean of `calls` calls a round]} for each CPU function of
    `cases`, the cases interleaved within each round, each warmed by one call first."""
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


# Other processes on the machine (other test runs, other sessions) steal cores and, worse,
# deschedule one of torch's OpenMP threads so that every parallel region waits for it.
# So: wait for a quiet machine before each timed round, and report how much CPU other
# processes used while each implementation ran.
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return math.nan
    return (sum(v) - v[3] - v[4]) / CLK_TCK  # all but idle and iowait


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ForeignLoad:
    """CPU used by other processes over an interval, as a fraction of all cores."""

    def __enter__(self):
        self.wall, self.busy, self.own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        foreign = (_machine_busy_s() - self.busy) - (_own_cpu_s() - self.own)
        self.fraction = max(0.0, foreign / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0
        return False


def wait_for_quiet(max_wait: float, threshold: float = 0.10) -> float:
    """Sleep until other processes use < threshold of the cores over half a second, at most
    max_wait seconds; returns the seconds waited."""
    waited = 0.0
    while True:
        with ForeignLoad() as load:
            time.sleep(0.5)
        if not load.fraction >= threshold or waited >= max_wait:  # NaN (no /proc): go
            return waited
        time.sleep(1.0)
        waited += 1.5


QUIET = 0.10  # a timed run during which other processes used less than this share of the cores


def clean(samples: list, others: list) -> list:
    """The samples taken on a quiet machine."""
    return [t for t, o in zip(samples, others) if o < QUIET]


def timed_with_load(fn, device: str):
    with ForeignLoad() as load:
        seconds, out = timed(fn, device)
    return seconds, out, load.fraction


def rotate(names: list, r: int) -> list:
    r %= len(names)
    return names[r:] + names[:r]


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mlifast_source() -> str:
    """Which mlifast is measured: its directory and commit (+dirty when mlifast/ or csrc/
    differ from it); a snapshot may carry its commit in a COMMIT file beside the package."""
    pkg = os.path.dirname(os.path.abspath(mlifast.__file__))
    root = os.path.dirname(pkg)
    stamp = os.path.join(root, "COMMIT")
    if os.path.exists(stamp):
        with open(stamp) as f:
            return f"{root} (snapshot of {f.read().strip()[:10]})"
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "mlifast", "csrc"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{root} (commit {commit}{' + uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        return root


def machine(device: str) -> dict:
    info = {
        "mlifast_source": mlifast_source(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mlifast": mlifast.__version__,
        "mlifast_ops": mlifast.info()["ops"],
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def ceiling(device: str, quick: bool, quiet_wait: float, dtype: torch.dtype = torch.float32) -> dict:
    """GEMM GFLOP/s in `dtype` (2048² matmul) and copy bandwidth GB/s (read + write bytes),
    from memory (256 MiB buffers) and from cache (8 MiB buffers: this machine's weights of
    1024² layers stay cache-resident between calls)."""
    waited = wait_for_quiet(quiet_wait)
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    reps = 5 if quick else 15
    for _ in range(2):
        torch.mm(a, b, out=c)
    with ForeignLoad() as load:
        gemm = [timed(lambda: torch.mm(a, b, out=c), device)[0] for _ in range(reps)]
        bandwidth = {}
        for label, mib in (("copy_gbs", 64 if quick else 256), ("cache_copy_gbs", 8)):
            numel = mib * 2**20 // 4
            src = torch.randn(numel, device=device)
            dst = torch.empty_like(src)
            dst.copy_(src)
            inner = max(1, 256 // mib)
            copies = [timed(lambda: [dst.copy_(src) for _ in range(inner)], device)[0] / inner for _ in range(reps)]
            bandwidth[label] = 2 * numel * 4 / statistics.median(copies) / 1e9
    return {"gemm_gflops": 2 * n**3 / statistics.median(gemm) / 1e9, **bandwidth,
            "load_avg": os.getloadavg()[0], "others": load.fraction, "waited_s": waited}


def best_ceiling(*measured: dict) -> dict:
    """A ceiling is what the machine can do: the best of the measurements."""
    return {k: max(m[k] for m in measured) for k in ("gemm_gflops", "copy_gbs", "cache_copy_gbs")}


# ----------------------------------------------------------------------------- model workloads


def peak_subprocess(workload: str, impl: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_peak", workload, impl, "--preset", args.preset,
           "--device", args.device, "--dtype", args.dtype, "--threads", str(torch.get_num_threads())]
    if args.mlifast_from:
        cmd += ["--mlifast-from", args.mlifast_from]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compare.py: the peak-memory run of {workload}/{impl} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _release_free_heap() -> None:
    """Hand memory that the set-up freed back to the OS (glibc malloc_trim). Tensors below
    malloc's mmap threshold live in the heap, and freed heap pages stay resident: without
    this, an implementation's first allocations reuse pages the set-up left behind (e.g.
    W3's temporaries while building the space: 1.2 GB) and go uncounted in the peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_child(workload: str, impl: str, preset: str, device: str, dtype: str) -> None:
    """One checking run of one implementation; prints {peak_mb, seconds, losses} as JSON.

    CPU peak: VmHWM (the resident high-water mark of this process's address space, which
    starts fresh at exec — ru_maxrss does not: it carries the forking parent's peak), reset
    to the current RSS after set-up through /proc/self/clear_refs, minus that RSS."""
    wl = W.make_workload(workload, preset, device, DTYPES[dtype])
    fn = W.impls_for(wl)[impl]
    gc.collect()
    _release_free_heap()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
        except OSError:
            pass
        base = _proc_status_kib("VmRSS")
    seconds, losses = timed(lambda: fn(wl), device)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (_proc_status_kib("VmHWM") - base) / 1024
    print(json.dumps({"peak_mb": peak_mb, "seconds": seconds, "losses": losses.tolist()}))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(ref, dtype=torch.float64).cpu()
    if a.shape != ref.shape:
        return math.inf
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run_model_workload(name: str, args) -> dict:
    wl = W.make_workload(name, args.preset, args.device, DTYPES[args.dtype])
    impls = W.impls_for(wl)
    names = list(impls)
    useful, fused = W.model_flops(wl)
    floor_bytes = W.model_bytes(wl)
    dtype_note = "" if args.dtype == "float32" else f", {args.dtype}"
    print(f"\n== {name}: {wl.title} ({wl.size_note}{dtype_note}); implementations: {', '.join(names)}", flush=True)
    for skipped, why in wl.skipped.items():
        print(f"   skipped {skipped}: {why}")

    # 1. one checking run per implementation (in a subprocess when measuring memory)
    first, peak = {}, {}
    for impl in names:
        if args.memory:
            out = peak_subprocess(name, impl, args)
            first[impl], peak[impl] = torch.tensor(out["losses"], dtype=torch.float64), out["peak_mb"]
            note = f"{out['seconds']:.2f} s in a fresh process, peak +{out['peak_mb']:.0f} MB"
        else:
            seconds, first[impl] = timed(lambda: impls[impl](wl), args.device)
            note = f"{seconds:.2f} s (warm-up)"
        print(f"   check run {impl:16s} {note}", flush=True)
    ref = first[W.REFERENCE_IMPL]
    errors = {impl: rel_err(first[impl], ref) for impl in names}
    rtol = LOSS_RTOL[args.dtype]
    if not errors["mlifast"] <= rtol:
        worst = int((first["mlifast"] - ref).abs().argmax())
        raise SystemExit(
            f"compare.py: FAIL {name}: mlifast's losses differ from the loop's by {errors['mlifast']:.3g} "
            f"relative (tolerance {rtol}); worst at coords {wl.coords[worst].tolist()}: "
            f"mlifast {float(first['mlifast'][worst]):.6f} vs loop {float(ref[worst]):.6f}"
        )
    for impl, err in errors.items():
        flag = "" if err <= rtol else f"  (above {rtol:g}: see notes)"
        print(f"   {impl:16s} max rel. err vs loop {err:.2e}{flag}")

    # 2. timed rounds, interleaved, order rotating
    times = {impl: [] for impl in names}
    foreign = {impl: [] for impl in names}
    r = 0
    max_rounds = args.repeats if args.quick else 2 * args.repeats  # --quick is a correctness test: no extra rounds
    while r < args.repeats or (r < max_rounds and min(len(clean(times[i], foreign[i])) for i in names) < 2):
        waited = wait_for_quiet(args.quiet_wait)
        for impl in rotate(names, r):
            seconds, _, load = timed_with_load(lambda: impls[impl](wl), args.device)
            times[impl].append(seconds)
            foreign[impl].append(load)
        r += 1
        print(f"   round {r}" + (" (extra: too few quiet runs)" if r > args.repeats else "")
              + (f" (waited {waited:.0f} s for a quiet machine)" if waited else "")
              + ": " + ", ".join(f"{i} {times[i][-1]:.2f}s (others {foreign[i][-1]:.0%})" for i in names), flush=True)

    medians = {impl: statistics.median(clean(times[impl], foreign[impl]) or times[impl]) for impl in names}
    rows = []
    for impl in names:
        t = medians[impl]
        rows.append({
            "impl": impl, "median_s": t, "min_s": min(times[impl]), "max_s": max(times[impl]),
            "vs_mlifast": t / medians["mlifast"], "gflops": useful / t / 1e9,
            "peak_mb": peak.get(impl), "rel_err": errors[impl], "samples": times[impl], "others": foreign[impl],
            "quiet": len(clean(times[impl], foreign[impl])), "runs": len(times[impl]),
        })
    return {
        "workload": name, "title": wl.title, "sizes": wl.size_note, "points": wl.num_points,
        "examples": wl.num_examples, "bn": wl.bn, "useful_gflop": useful / 1e9, "fused_gflop": fused / 1e9,
        "floor_gb": floor_bytes / 1e9, "weight_mb": wl.weight_bytes / 2**20, "peak_vs_weights": wl.peak_vs_weights,
        "rows": rows, "skipped": dict(wl.skipped),
    }


# ----------------------------------------------------------------------------- W4: the op sweep


def time_op(fn, case, device: str, target: float) -> tuple[int]:
    fn(case)
    t, _ = timed(lambda: fn(case), device)
    return max(1, min(1000, int(target / max(t, 1e-7))))


def run_op_sweep(args, shared: bool = False) -> dict:
    sizes = W.SIZES[args.preset]["W4"]
    f = sizes["features"]
    names = list(W.SHARED_OP_IMPLS if shared else W.OP_IMPLS)
    points, row_counts = (sizes["shared_points"], sizes["shared_rows"]) if shared else (sizes["points"], sizes["rows"])
    target = 0.003 if args.quick else 0.02
    samples = 3 if args.quick else 5
    label = "W4-shared" if shared else "W4"
    print(f"\n== {label}: multipoint_linear {f}×{f}, K ∈ {points}, R ∈ {row_counts}"
          + (", one input shared by every point (a first layer)" if shared else "")
          + f"; implementations: {', '.join(names)}", flush=True)
    rows = []
    for k in points:
        for r in row_counts:
            case = W.op_case_to(W.make_op_case(k, r, f, shared=shared), args.device)
            ref = W.op_reference(case)
            errs = {}
            for impl in names:
                if impl == "dense-1W":
                    continue
                errs[impl] = rel_err(W.OP_IMPLS[impl](case), ref)
                if not errs[impl] <= OP_RTOL:
                    raise SystemExit(
                        f"compare.py: FAIL {label} K={k} R={r}: {impl} differs from the float64 oracle by "
                        f"{errs[impl]:.3g} relative to max |y| (tolerance {OP_RTOL})"
                    )
            iters = {impl: time_op(W.OP_IMPLS[impl], case, args.device, target) for impl in names}
            for attempt in range(2):  # measure again once if other processes got in the way
                per_call = {impl: [] for impl in names}
                waited = wait_for_quiet(args.quiet_wait)
                with ForeignLoad() as load:  # over the whole case: one sample is too short for /proc/stat's ticks
                    for s in range(samples):
                        for impl in rotate(names, s):
                            fn, n = W.OP_IMPLS[impl], iters[impl]
                            t, _ = timed(lambda: [fn(case) for _ in range(n)], args.device)
                            per_call[impl].append(t / n)
                worst = load.fraction
                if worst < QUIET:
                    break
            med = {impl: statistics.median(v) for impl, v in per_call.items()}
            rows.append({
                "K": k, "R": r, "us": {i: v * 1e6 for i, v in med.items()},
                "vs_mlifast": {i: v / med["mlifast"] for i, v in med.items()},
                "gflops": {i: case.flops / v / 1e9 for i, v in med.items()},
                "flops": case.flops, "fused_flops": case.fused_flops, "bytes": case.bytes, "rel_err": errs,
                "foreign": worst,
            })
            print(f"   K={k:3d} R={r:4d}: " + ", ".join(f"{i} {med[i] * 1e6:.0f}µs" for i in names)
                  + f" (others ≤ {worst:.0%}" + (f", waited {waited:.0f} s" if waited else "") + ")", flush=True)
    return {"workload": label, "features": f, "rows": rows, "impls": names, "shared": shared}


# ----------------------------------------------------------------------------- report


def add_floors(model_results: list, op_results: list, ceil: dict) -> None:
    """Each time against its floor. Model workloads: the larger of the fused algorithm's
    FLOPs at the measured GEMM rate and its compulsory bytes (weights and directions read
    once per batch) at the memory copy rate; the op: FLOPs, or bytes at the cache copy rate."""
    for res in model_results:
        res["floor_flop_s"] = res["fused_gflop"] / ceil["gemm_gflops"]
        res["floor_bytes_s"] = res.get("floor_gb", 0.0) / ceil["copy_gbs"]
        res["floor_s"] = max(res["floor_flop_s"], res["floor_bytes_s"])
        for row in res["rows"]:
            row["x_floor"] = row["median_s"] / res["floor_s"]
            if row["peak_mb"] is not None and res.get("weight_mb"):
                row["peak_x_weights"] = row["peak_mb"] / res["weight_mb"]
    for row in (r for res in op_results for r in res["rows"]):
        floor_s = max(row["fused_flops"] / (ceil["gemm_gflops"] * 1e9), row["bytes"] / (ceil["cache_copy_gbs"] * 1e9))
        row["floor_us"] = floor_s * 1e6
        row["x_floor"] = row["us"]["mlifast"] / row["floor_us"]


def fmt_s(t: float) -> str:
    return f"{t:.3f}" if t < 10 else f"{t:.2f}"


def fmt_n(x: float) -> str:
    """A positive quantity with 3 significant digits, no exponent above 1."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def model_table(results: list) -> str:
    out = ["| workload | implementation | median s | min–max s | quiet runs | × mlifast | GFLOP/s | × floor | peak MB | rel. err vs loop |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for i, row in enumerate(res["rows"]):
            label = f"{res['workload']} ({res['sizes']})" if i == 0 else ""
            peak = "—" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
            out.append(
                f"| {label} | {row['impl']} | {fmt_s(row['median_s'])} | {fmt_s(row['min_s'])}–{fmt_s(row['max_s'])} | "
                f"{row['quiet']}/{row['runs']} | {row['vs_mlifast']:.2f} | {row['gflops']:.1f} | {row['x_floor']:.1f} | {peak} | "
                f"{row['rel_err']:.1e} |"
            )
        for impl, why in res["skipped"].items():
            out.append(f"| | {impl} | skipped | | | | | | {why} | |")
    return "\n".join(out)


def op_table(res: dict) -> str:
    n = res["impls"]
    head = ("| K | R | " + " | ".join(f"{i} µs" for i in n) + " | "
            + " | ".join(f"{i} / mlifast" for i in n if i != "mlifast")
            + " | mlifast GFLOP/s | floor µs | mlifast × floor | others' CPU |")
    out = [head, "|" + "---:|" * (2 + len(n) + len(n) - 1 + 4)]
    for row in res["rows"]:
        out.append(
            f"| {row['K']} | {row['R']} | " + " | ".join(f"{row['us'][i]:.0f}" for i in n) + " | "
            + " | ".join(f"{row['vs_mlifast'][i]:.2f}" for i in n if i != "mlifast")
            + f" | {row['gflops']['mlifast']:.1f} | {row['floor_us']:.0f} | {row['x_floor']:.1f} | {row['foreign']:.0%} |"
        )
    return "\n".join(out)


def fix_malloc_thresholds() -> None:
    """glibc's mmap threshold at 32 MiB and trim threshold at 2 GiB, as mlifast.evaluate
    leaves them, for every implementation from the start (written out here: --mlifast-from
    may measure a commit before that). A loop forming each point's state in fresh tensors
    keeps its heap under them: W3's loop 13.8 s under a 64 MiB trim threshold, 9.4 s under
    2 GiB."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: the CI correctness smoke test (< 60 s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="the model workloads' models, spaces and inputs, and the GEMM ceiling (W4 is float32 "
                        "only, and not run otherwise)")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma-separated subset of W1,W2,W3,W4,W5")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per model workload (default 3)")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--memory", dest="memory", action="store_true", default=None,
                     help="measure peak memory (default: on, off with --quick)")
    mem.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="before each timed round, wait up to this many seconds for other processes to "
                        "leave the CPUs idle (default 60, 0 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--mlifast-from", metavar="DIR",
                   help="measure the mlifast package found in DIR (a snapshot of one commit) instead of the installed one")
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--_peak", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.preset = args.preset or ("quick" if args.quick else "full")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch has no CUDA device here")
    fix_malloc_thresholds()
    if args._peak:
        peak_child(*args._peak, args.preset, args.device, args.dtype)
        return 0
    if args.memory is None:
        args.memory = not args.quick
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 60.0
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in ALL_WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {ALL_WORKLOADS}")
    if args.dtype != "float32" and "W4" in chosen:
        print(f"W4 not run: the op sweep is float32, its floor the float32 GEMM rate (--dtype {args.dtype})")
        chosen.remove("W4")

    started = time.perf_counter()
    info = machine(args.device)
    print(f"mlifast {info['mlifast']} · torch {info['torch']} · {info['cpu']} · {info['cores']} cores "
          f"({info['torch_threads']} torch threads, {info['cpu_capability']}) · device {args.device}"
          + (f" ({info['gpu']})" if args.device == "cuda" else "") + f" · preset {args.preset} · {args.dtype}")
    print(f"mlifast from {info['mlifast_source']}; ops: {json.dumps(info['mlifast_ops'])}")
    ceil_start = ceiling(args.device, args.quick, args.quiet_wait, DTYPES[args.dtype])
    print(f"ceiling: GEMM {ceil_start['gemm_gflops']:.0f} GFLOP/s ({args.dtype} 2048²), copy "
          f"{ceil_start['copy_gbs']:.1f} GB/s (memory), {ceil_start['cache_copy_gbs']:.1f} GB/s (cache), "
          f"others' CPU {ceil_start['others']:.0%}", flush=True)

    model_results, op_results, failures = [], [], {}
    for name in chosen:
        try:  # a failing workload is reported, and the others still run
            if name == "W4":
                op_results.append(run_op_sweep(args))
                op_results.append(run_op_sweep(args, shared=True))
            else:
                model_results.append(run_model_workload(name, args))
        except (SystemExit, Exception) as e:  # noqa: BLE001
            failures[name] = str(e) if isinstance(e, SystemExit) else traceback.format_exc()
            print(failures[name], flush=True)
    ceil_end = ceiling(args.device, args.quick, args.quiet_wait, DTYPES[args.dtype])
    ceil = best_ceiling(ceil_start, ceil_end)
    add_floors(model_results, op_results, ceil)
    elapsed = time.perf_counter() - started

    print("\n## Machine ceiling (measured at start and end of this run; floors use the best)\n")
    print(f"| | GEMM GFLOP/s ({args.dtype} 2048²) | copy GB/s, memory (256 MiB) | copy GB/s, cache (8 MiB) | others' CPU |\n"
          "|---|---:|---:|---:|---:|")
    for label, c in (("start", ceil_start), ("end", ceil_end)):
        print(f"| {label} | {c['gemm_gflops']:.0f} | {c['copy_gbs']:.1f} | {c['cache_copy_gbs']:.1f} | {c['others']:.0%} |")
    if model_results:
        print(f"\n## Model workloads ({args.repeats} interleaved rounds"
              + ("" if args.quick else f", up to {2 * args.repeats} when other processes interfered")
              + "; × mlifast = median time / mlifast's median time: above 1, mlifast is faster)\n")
        print(model_table(model_results))
        print()
        for res in model_results:
            bytes_bound = res["floor_bytes_s"] > res["floor_flop_s"]
            print(f"- {res['workload']}: {res['title']}; useful {fmt_n(res['useful_gflop'])} GFLOP (K one-point forwards"
                  f"{', ×2 for the statistics pass' if res['bn'] == 'recompute' else ''}), fused algorithm "
                  f"{fmt_n(res['fused_gflop'])} GFLOP → {fmt_n(res['floor_flop_s'])} s at the best GEMM rate; weights + "
                  f"directions read once per batch {fmt_n(res['floor_gb'])} GB → {fmt_n(res['floor_bytes_s'])} s at "
                  f"the memory copy rate; floor {fmt_n(res['floor_s'])} s ({'bytes' if bytes_bound else 'FLOPs'})")
            peaks = [(row["impl"], row["peak_x_weights"]) for row in res["rows"] if "peak_x_weights" in row]
            if res.get("peak_vs_weights") and peaks:
                print(f"- {res['workload']} peak memory in copies of the weights ({res['weight_mb']:.0f} MB): "
                      + ", ".join(f"{impl} {x:.2f}×" for impl, x in peaks))
        print("- median over the quiet runs (other processes used < 10% of the cores, from /proc/stat), or over all "
              "runs when none was quiet; min–max over all runs")
        if not args.memory:
            print("- peak memory not measured (--quick / --no-memory)")
    for res in op_results:
        f = res["features"]
        print(f"\n## {res['workload']}: multipoint_linear, {f}×{f}, one direction, "
              + ("input (R, I) shared by every point; " if res["shared"] else "input (K, R, I); ")
              + "median per call; GFLOP/s count K·R rows; floor = max(fused FLOPs / GEMM rate, "
              "(W0 + D + x + y) bytes / cache copy rate)\n")
        print(op_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args),
                       "ceiling": {"start": ceil_start, "end": ceil_end, "best": ceil},
                       "models": model_results, "ops": op_results, "failures": failures,
                       "elapsed_s": elapsed}, f, indent=1)
    if failures:
        print(f"\ncompare.py: FAILED {', '.join(failures)} (above); the rest ran; {elapsed:.0f} s in all")
        return 1
    print(f"\ncompare.py: all checks passed; {elapsed:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
