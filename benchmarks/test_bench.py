"""pytest-benchmark versions of compare.py's workloads, at tiny sizes, and families.py's
quick check of every model family (mlifast against the loop, no timing).

    .venv/bin/python -m pytest benchmarks/test_bench.py --benchmark-enable      # time them
    .venv/bin/python -m pytest benchmarks/test_bench.py --benchmark-enable --benchmark-autosave
    .venv/bin/pytest-benchmark compare                                           # regressions, same machine

The project's pytest configuration passes --benchmark-disable, under which each benchmarked
function runs once (a correctness smoke test, a few seconds in all); its testpaths is
tests/, so `pytest` alone never collects this file. compare.py is the place for the
interleaved, same-run ratios that BENCHMARKS.md reports.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import families  # noqa: E402
import mlifast  # noqa: E402
import workloads as W  # noqa: E402

PRESET = os.environ.get("MLIFAST_BENCH_PRESET", "tiny")  # or "quick", "full"


@pytest.fixture(scope="module", params=sorted(W.MODEL_WORKLOADS))
def workload(request):
    return W.MODEL_WORKLOADS[request.param](PRESET)


@pytest.fixture(scope="module")
def reference(workload):
    return W.MODEL_IMPLS[W.REFERENCE_IMPL](workload)


@pytest.mark.parametrize("impl", list(W.MODEL_IMPLS))
def test_model_workload(benchmark, workload, reference, impl):
    fn = W.impls_for(workload).get(impl)
    if fn is None:
        pytest.skip(f"{impl} on {workload.name}: {workload.skipped[impl]}")
    benchmark.group = f"{workload.name}: {workload.title} ({workload.size_note})"
    benchmark.extra_info.update(workload=workload.name, points=workload.num_points, examples=workload.num_examples)
    losses = benchmark.pedantic(fn, args=(workload,), rounds=3, iterations=1, warmup_rounds=1)
    assert torch.allclose(losses, reference, rtol=1e-4, atol=0), (impl, losses, reference)


OP_SHAPES = [(k, r) for k in W.SIZES[PRESET]["W4"]["points"] for r in W.SIZES[PRESET]["W4"]["rows"]]


@pytest.mark.parametrize("impl", list(W.OP_IMPLS))
@pytest.mark.parametrize("points,rows", OP_SHAPES, ids=[f"K{k}-R{r}" for k, r in OP_SHAPES])
def test_multipoint_linear(benchmark, impl, points, rows):
    features = W.SIZES[PRESET]["W4"]["features"]
    case = W.make_op_case(points, rows, features)
    benchmark.group = f"W4 multipoint_linear K={points} R={rows} {features}×{features}"
    benchmark.extra_info.update(flops=case.flops, bytes=case.bytes)
    y = benchmark(W.OP_IMPLS[impl], case)
    if impl != "dense-1W":  # not a multi-point computation: nothing to compare
        ref = W.op_reference(case)
        assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 1e-4


@pytest.mark.parametrize("impl", ["relu_line_linear", "per-point GEMMs"])
@pytest.mark.parametrize("points,rows", OP_SHAPES, ids=[f"K{k}-R{r}" for k, r in OP_SHAPES])
def test_relu_line_linear(benchmark, impl, points, rows):
    """The layer after an MLP's first ReLU along a line: the switching-unit op against the
    ReLU'd combine + per-point GEMMs it replaces (benchmarks/relu_line_crossover.py)."""
    features = W.SIZES[PRESET]["W4"]["features"]
    g = torch.Generator().manual_seed(0)
    a, e = torch.randn(rows, features, generator=g), torch.randn(rows, features, generator=g)
    w, d = torch.randn(2, features, features, generator=g) / features**0.5
    b, db = torch.randn(2, features, generator=g)
    c = torch.linspace(0, 1, points)
    benchmark.group = f"relu_line_linear K={points} R={rows} {features}×{features}"

    def run():
        if impl == "relu_line_linear":
            return mlifast.ops.relu_line_linear(a, e, w, d, b, db, c, True)
        h = mlifast.ops.multipoint_combine(a, e.unsqueeze(1), None, None, c[:, None], True)
        return mlifast.ops.multipoint_linear(h, w, b, d[None], db[None], c[:, None], True)

    y = benchmark(run)
    ref = mlifast.ops.relu_line_linear_reference(a.double(), e.double(), w.double(), d.double(), b.double(),
                                                 db.double(), c.double(), True)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.parametrize("case", list(families.CASES))
def test_families_agree_with_loop(case):
    """families.py --quick for one case: every point's loss within families.RTOL of the loop's."""
    err, losses, _ = families.check(families.workload(case, "quick"))
    assert err <= families.RTOL, (case, err, losses)


def test_call_parts_counts_one_call():
    """call_parts.py on W3 (one batch): each copy made once, the check's two reference
    points, one run on all points, and the parts within the call's time; the wrapped
    functions are restored afterwards."""
    import call_parts
    from mlifast.multipoint import reference

    at = reference.PerPointModel.at
    r = call_parts.measure(W.make_workload("W3", "tiny"), calls=2)
    assert r.calls == {"copy: rules": 1, "copy: reference": 1, "probe of sizes": 1, "reference points": 2,
                       "runs on all points": 1}
    assert 0 < sum(r.spent.values()) <= r.total
    assert reference.PerPointModel.at is at
