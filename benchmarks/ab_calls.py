#!/usr/bin/env python
"""Median time of one `evaluate` call on model workloads: for A/B runs of two snapshots.

    python benchmarks/ab_calls.py W3:bfloat16 W3 W2 [--device cuda] [--calls 10]
    python benchmarks/ab_calls.py W3 --mlifast-from /tmp/snap   # a snapshot (see compare.py)

Prints one line per workload: the median and the range of `--calls` calls after three
warm-up calls (the first-call check runs in every call: each builds its own model), and
the loss at the first point, which two snapshots must agree on. Run the snapshots in
alternating fresh processes: timings on shared machines drift.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import compare  # noqa: F401 — first: it honours --mlifast-from before mlifast is imported
import torch

import mlifast
import workloads as W


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="+", help="model workloads, each optionally :bfloat16")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--mlifast-from", metavar="DIR", help="measure the mlifast package in DIR")
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for spec in args.workloads:
        name, _, dtype = spec.partition(":")
        wl = W.to_device(W.make_workload(name, "full", args.device), args.device, getattr(torch, dtype or "float32"))
        for _ in range(3):
            W.run_mlifast(wl)
        seconds = []
        for _ in range(args.calls):
            sync()
            start = time.perf_counter()
            loss = W.run_mlifast(wl)
            sync()
            seconds.append(time.perf_counter() - start)
        print(f"{spec}: {statistics.median(seconds) * 1e3:.1f} ms median, {min(seconds) * 1e3:.1f}–"
              f"{max(seconds) * 1e3:.1f} over {args.calls} calls; loss[0] {loss[0].item():.6f} "
              f"(mlifast from {mlifast.__file__.rsplit('/mlifast/', 1)[0]})", flush=True)
        del wl
    return 0


if __name__ == "__main__":
    sys.exit(main())
