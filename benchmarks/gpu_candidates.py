#!/usr/bin/env python
"""Changes to the GPU path that wait for a GPU to time them, A/B in one process.

    python benchmarks/gpu_candidates.py [--device cuda] [--workload W2] [--rounds 5]

On W2 (ResNet-20, bn="recompute", K = 50) at full size, interleaved rounds with each of two
choices on the device or off:
- "channels-last": image batches channels-last (`model.CHANNELS_LAST_DEVICES`; on CUDA,
  cuDNN's TF32 kernels are NHWC, and on an H200 12.8 of W2's 53 ms of CUDA time went to
  converting NCHW around them);
- "bn passes": batch norms through channel_moments and channel_affine
  (`layers.CHANNEL_PASSES_DEVICES`; the CUDA kernels cuda_check.py checks), the residual
  addition and ReLU joining the second pass.
Both are on for the CPU. On CUDA, channels-last is on since an H200 ran W2 1.21× faster
with it, and the batch-norm passes are off (0.79× there; BENCHMARKS.md, fifteenth session).
Each variant's losses are checked against the loop's (relative 1e-2: TF32); the table gives
the median time and its ratio to "neither". gpu_check.sh runs it; on the CPU it measures
what each choice gave there.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import os
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402
from mlifast.multipoint import layers, model  # noqa: E402

VARIANTS = {"neither": (), "channels-last": ("layout",), "bn passes": ("bn",), "both": ("layout", "bn")}


def switched(device: str, on: tuple) -> None:
    """The two choices for `device`: on where named in `on`, else off."""
    for choice, devices in (("layout", model.CHANNELS_LAST_DEVICES), ("bn", layers.CHANNEL_PASSES_DEVICES)):
        if choice in on:
            devices.add(device)
        else:
            devices.discard(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="W2", choices=sorted(W.MODEL_WORKLOADS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    wl = W.make_workload(args.workload, "full", args.device)
    expected = W.run_loop_state_dict(wl)
    times: dict[str, list] = {name: [] for name in VARIANTS}
    ok = True
    for round_ in range(args.rounds + 1):  # (round 0: warm-up and check)
        for name, on in VARIANTS.items():
            switched(args.device, on)
            sync()
            start = time.perf_counter()
            losses = W.run_mlifast(wl)
            sync()
            seconds = time.perf_counter() - start
            if round_ == 0:
                err = ((losses - expected).abs().max() / expected.abs().max()).item()
                good = err < 1e-2
                ok &= good
                print(f"{name:14s} rel. err vs loop {err:.1e}{'' if good else '  FAIL'}")
            else:
                times[name].append(seconds)
    base = statistics.median(times["neither"])
    card = torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"
    print(f"\n{args.workload} on {card}, {args.rounds} rounds")
    print("| variant | median s | min–max s | × neither |\n|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.4f} | {min(t):.4f}–{max(t):.4f} | {base / statistics.median(t):.2f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
