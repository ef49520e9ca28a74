#!/usr/bin/env python
"""Where one workload's time goes: torch.profiler over mlifast and the loop.

    python benchmarks/profile_workload.py W1 [--device cuda] [--dtype bfloat16] [--preset quick] [--rows 15]

Runs the workload once to warm up, then once under the profiler for each of mlifast and the
loop baseline, and prints each one's wall time and its top operators by self time (CPU, and
CUDA on a GPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=sorted(W.MODEL_WORKLOADS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--preset", default="full", choices=sorted(W.SIZES))
    p.add_argument("--rows", type=int, default=15, help="operators shown per table")
    args = p.parse_args()
    wl = W.to_device(W.make_workload(args.workload, args.preset, args.device), args.device,
                     getattr(torch, args.dtype))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort_key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    for name, run in (("mlifast", W.run_mlifast), ("loop", W.run_loop_state_dict)):
        run(wl)  # warm-up: first-call checks, allocator, kernels loaded
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            run(wl)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        print(f"\n== {args.workload} {name}: {seconds:.3f} s under the profiler")
        print(prof.key_averages().table(sort_by=sort_key, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
