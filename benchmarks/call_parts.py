#!/usr/bin/env python
"""Where one `evaluate` call's time goes: its fixed costs against the points' own work.

    python benchmarks/call_parts.py W3 [--device cuda] [--dtype bfloat16] [--preset full] [--calls 5]

Times, per call (mean over `--calls` after two warm-up calls), the parts that every call
pays once: the two copies of the model (`MultiPointModel`'s rules and the first-call
check's reference), the probe of activation sizes (`chunking.plan`), the reference's
points and the copied model's runs on all points; "other" is the rest of the call (the
loss, moving data). Python's garbage collector runs when it runs, inside any of them:
the line below the table gives its share. On a GPU each part synchronises the device at
its end, so the parts add up to the call. On a workload of one batch (W3) the fixed
costs decide the ratio to the loop; on many batches (W1) the runs do.
"""
from __future__ import annotations

import argparse
import collections
import functools
import gc
import importlib
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402
from mlifast.multipoint import model as model_module, reference  # noqa: E402

evaluate_module = importlib.import_module("mlifast.engine.evaluate")  # (the package exports the function)

PARTS = (  # (owner, attribute, label); a part called inside another counts as the outer one's
    (model_module, "_multipoint_copy", "copy: rules"),
    (reference.PerPointModel, "__init__", "copy: reference"),
    (evaluate_module, "plan", "probe of sizes"),
    (reference.PerPointModel, "at", "reference points"),
    (model_module.MultiPointModel, "_run", "runs on all points"),
)


@dataclass
class CallParts:
    total: float  # seconds per call
    spent: dict  # label -> seconds per call
    calls: dict  # label -> calls per call
    collecting: float  # seconds per call in Python's garbage collector
    full_collections: float  # per call


def measure(wl: W.ModelWorkload, calls: int = 5, device: str = "cpu") -> CallParts:
    """CallParts of `calls` evaluate calls on `wl` (after two warm-up calls)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    spent, counts, collected = collections.Counter(), collections.Counter(), collections.Counter()
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in PARTS]
    gc_callback, active = _gc_timer(collected), []  # (active: the parts running now, outermost first)
    try:
        for owner, name, label in PARTS:
            setattr(owner, name, _timed(getattr(owner, name), label, spent, counts, sync, active))
        gc.callbacks.append(gc_callback)
        for _ in range(2):
            W.run_mlifast(wl)
        spent.clear(), counts.clear(), collected.clear()
        total = 0.0
        for _ in range(calls):
            sync()
            start = time.perf_counter()
            W.run_mlifast(wl)
            sync()
            total += time.perf_counter() - start
    finally:
        if gc_callback in gc.callbacks:
            gc.callbacks.remove(gc_callback)
        for owner, name, f in saved:
            setattr(owner, name, f)
    return CallParts(total / calls, {k: v / calls for k, v in spent.items()}, {k: v / calls for k, v in counts.items()},
                     collected["s"] / calls, collected["full"] / calls)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=sorted(W.MODEL_WORKLOADS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--preset", default="full", choices=("full", "quick", "tiny"))
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    wl = W.to_device(W.make_workload(args.workload, args.preset, args.device), args.device,
                     getattr(torch, args.dtype))
    r = measure(wl, args.calls, args.device)
    print(f"{wl.name} ({wl.size_note}, {args.dtype}, {args.device}): {r.total * 1e3:.1f} ms per evaluate call")
    print("| part | ms per call | calls per call |\n|---|---:|---:|")
    for _, _, label in PARTS:
        print(f"| {label} | {r.spent.get(label, 0) * 1e3:.1f} | {r.calls.get(label, 0):g} |")
    print(f"| other | {(r.total - sum(r.spent.values())) * 1e3:.1f} | |")
    print(f"garbage collection inside the call: {r.collecting * 1e3:.1f} ms per call "
          f"({r.full_collections:g} full collections per call)")
    return 0


def _timed(f, label, spent, calls, sync, active):
    """f, its time added to `label`'s unless it runs inside another part (the probe's runs)."""

    @functools.wraps(f)
    def timed(*a, **k):
        if active:
            return f(*a, **k)
        active.append(label)
        start = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            sync()
            spent[label] += time.perf_counter() - start
            calls[label] += 1
            active.pop()
    return timed


def _gc_timer(collected):
    started = [0.0]

    def callback(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collected["s"] += time.perf_counter() - started[0]
            collected["full"] += info["generation"] == 2
    return callback


if __name__ == "__main__":
    sys.exit(main())
