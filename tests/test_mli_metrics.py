"""Tests of mlifast.analysis.mli: Δ_min, bumps, monotonicity, barriers, weight distances.

Expected values are computed by hand (or by an independent brute-force / reference
implementation written here), never by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlifast.analysis import mli
from mlifast.analysis.mli import (
    Bump,
    average_bump_height,
    barrier_height,
    bumps,
    delta_min,
    endpoint_barrier,
    fraction_non_monotonic,
    is_monotonic,
    max_step_increase,
    summarize,
    weight_distance,
)

FAST = settings(max_examples=150, deadline=None)

# Curves: arbitrary bounded floats, and small integers (many ties: L_e == L_s edge cases).
float_curves = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=40,
)
tie_curves = st.lists(st.integers(min_value=-3, max_value=3).map(float), min_size=1, max_size=40)
curves = st.one_of(float_curves, tie_curves)


# ----------------------------------------------------------------------------- references


def brute_delta_min(losses):
    """O(n²) definition: max(0, max_{i<j} L_j − L_i)."""
    best = 0.0
    for j in range(len(losses)):
        for i in range(j):
            best = max(best, losses[j] - losses[i])
    return best


def official_bumps(alphas, losses):
    """Independent re-implementation of the official eval_monotonic as described in
    research/mli_paper.md §1.3, *including* its last-step quirk.

    Returns ([(s, e, height), ...], missed) where ``missed`` says a rise began at the last
    step outside a bump (the quirk: it is opened but never recorded)."""
    n = len(losses)
    out = []
    inside = False
    missed = False
    s = 0
    h = 0.0
    for i in range(1, n):
        if not inside:
            if losses[i] > losses[i - 1]:  # opens, but is never closed if i == n-1
                inside, s, h = True, i - 1, losses[i] - losses[i - 1]
                missed = i == n - 1
        elif losses[i] < losses[s]:
            out.append((s, i, h))
            inside = False
        else:
            h = max(h, losses[i] - losses[s])
            if i == n - 1:
                out.append((s, i, h))
    return out, missed


# ----------------------------------------------------------------------------- Δ_min


def test_delta_min_hand_example():
    # largest rise above the running minimum: 0.7 − 0 (i=1, j=4)
    assert delta_min([1, 0, 0.5, 0.2, 0.7]) == pytest.approx(0.7, abs=1e-15)


@pytest.mark.parametrize(
    "curve",
    [[3.0, 2.0, 2.0, 1.0, -5.0], [1.0], [0.0, 0.0, 0.0], list(np.linspace(2, 0, 50))],
)
def test_monotone_curves_have_zero_delta_and_no_bumps(curve):
    assert delta_min(curve) == 0.0
    assert max_step_increase(curve) == 0.0
    assert is_monotonic(curve)
    assert bumps(np.linspace(0, 1, len(curve)), curve) == []


def test_rise_at_last_step_is_detected():
    # The official code misses this (research notes §6.5); the true Δ_min is 0.1.
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 0.8, 0.5, 0.2, 0.3]
    assert delta_min(losses) == pytest.approx(0.1)
    assert not is_monotonic(losses)
    (b,) = bumps(alphas, losses)
    assert (b.start, b.end, b.start_index, b.end_index, b.closed) == (0.75, 1.0, 3, 4, False)
    assert b.height == pytest.approx(0.1)
    assert official_bumps(alphas, losses) == ([], True)  # the reference has the quirk


def test_input_types_agree():
    values = [1.0, 0.0, 0.5, 0.2, 0.75]
    expected = 0.75
    assert delta_min(values) == expected
    assert delta_min(np.array(values)) == expected
    assert delta_min(torch.tensor(values, dtype=torch.float64)) == expected
    assert delta_min(torch.tensor(values, requires_grad=True)) == expected
    assert isinstance(delta_min(torch.tensor(values)), float)


def test_nan_and_bad_shapes():
    assert math.isnan(delta_min([1.0, float("nan"), 0.5]))
    assert math.isnan(max_step_increase([1.0, float("nan")]))
    assert not is_monotonic([1.0, float("nan"), 0.5])
    with pytest.raises(ValueError, match="NaN"):
        bumps([0, 1, 2], [1.0, float("nan"), 0.5])
    with pytest.raises(ValueError, match="empty"):
        delta_min([])
    with pytest.raises(ValueError, match="1-D"):
        delta_min(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same length"):
        bumps([0, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="increasing"):
        bumps([0, 1, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="tol"):
        is_monotonic([1.0, 0.0], tol=-1.0)


def test_infinite_losses():
    assert delta_min([1.0, 0.5, float("inf")]) == float("inf")
    assert delta_min([float("inf"), float("inf"), 2.0]) == 0.0


@FAST
@given(curves, st.floats(min_value=-1e3, max_value=1e3, allow_nan=False))
def test_delta_min_shift_invariant(losses, c):
    # Exact invariance fails in floating point; the tolerance is a few ulps of the values.
    shifted = [x + c for x in losses]
    scale = max([abs(x) for x in losses + shifted] + [1.0])
    assert delta_min(shifted) == pytest.approx(delta_min(losses), abs=8 * scale * 2.0**-52)


@FAST
@given(curves)
def test_delta_min_equals_brute_force_and_is_non_negative(losses):
    d = delta_min(losses)
    assert d >= 0.0
    # Subtraction is monotone under rounding, so the O(n) and O(n²) forms agree exactly.
    assert d == brute_delta_min(losses)
    assert max_step_increase(losses) <= d


@FAST
@given(curves)
def test_delta_min_zero_for_non_increasing(losses):
    desc = sorted(losses, reverse=True)
    assert delta_min(desc) == 0.0
    assert is_monotonic(desc)
    assert bumps(list(range(len(desc))), desc) == []


@FAST
@given(curves)
def test_is_monotonic_iff_delta_min_zero(losses):
    assert is_monotonic(losses) == (delta_min(losses) == 0.0)
    steps = [b - a for a, b in zip(losses, losses[1:])]
    worst = max(steps, default=0.0)
    # a per-step tolerance at the worst step admits the curve
    assert is_monotonic(losses, tol=max(worst, 0.0) * (1 + 1e-12) + 1e-9)


# ----------------------------------------------------------------------------- bumps


def test_two_bumps_hand_made():
    alphas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    losses = [3.0, 1.0, 2.0, 0.5, 0.25, 1.75, 0.125]
    # bump 1: starts at index 1 (L=1), peaks 2 (height 1), ends at index 3 (0.5 < 1)
    # bump 2: starts at index 4 (L=0.25), peaks 1.75 (height 1.5), ends at 6 (0.125 < 0.25)
    got = bumps(alphas, losses)
    assert got == [
        Bump(0.1, 0.3, 1.0, start_index=1, end_index=3, closed=True),
        Bump(0.4, 0.6, 1.5, start_index=4, end_index=6, closed=True),
    ]
    assert got[0].width == pytest.approx(0.2)
    assert delta_min(losses) == 1.5


def test_full_width_bump():
    (b,) = bumps([0.0, 0.5, 1.0], [1.0, 2.0, 0.5])
    assert (b.start, b.end, b.height, b.closed) == (0.0, 1.0, 1.0, True)
    assert b.width == 1.0


def test_later_higher_peak_after_partial_dip_is_one_bump():
    # The dip to 0.5 does not go below L_s = 0, so 0.5 and 0.75 are one bump of height 0.75.
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 0.0, 0.5, 0.25, 0.75]
    (b,) = bumps(alphas, losses)
    assert (b.start, b.end, b.height, b.closed) == (0.25, 1.0, 0.75, False)
    assert delta_min(losses) == 0.75


def test_equal_to_start_does_not_end_bump():
    # L_e == L_s is not "below": the bump continues to the rise at the end.
    (b,) = bumps([0, 1, 2, 3], [1.0, 2.0, 1.0, 1.5])
    assert (b.start_index, b.end_index, b.height, b.closed) == (0, 3, 1.0, False)


@FAST
@given(curves)
def test_max_bump_height_equals_delta_min(losses):
    alphas = list(range(len(losses)))
    heights = [b.height for b in bumps(alphas, losses)]
    assert max(heights, default=0.0) == brute_delta_min(losses)
    assert all(h > 0 for h in heights)


@FAST
@given(curves)
def test_bumps_match_official_except_last_step_quirk(losses):
    alphas = [i / 7 for i in range(len(losses))]
    ours = [(b.start_index, b.end_index, b.height) for b in bumps(alphas, losses)]
    ref, missed = official_bumps(alphas, losses)
    n = len(losses)
    if missed:
        assert ours[:-1] == ref
        assert ours[-1] == (n - 2, n - 1, losses[-1] - losses[-2])
    else:
        assert ours == ref
    for b in bumps(alphas, losses):
        assert b.start == alphas[b.start_index] and b.end == alphas[b.end_index]
        assert b.closed == (losses[b.end_index] < losses[b.start_index])


# ----------------------------------------------------------------------------- barriers


def test_barrier_height_hand_example():
    # monotone but not convex: chord at t=.25 is 3, loss 3.5 → barrier 0.5
    alphas = [0.0, 0.25, 0.5, 1.0]
    losses = [4.0, 3.5, 1.0, 0.0]
    assert barrier_height(alphas, losses) == 0.5
    assert endpoint_barrier(losses) == 4.0 - 2.0
    # an extended grid with the same relative positions gives the same chord
    assert barrier_height([-1.0, 0.0, 1.0, 3.0], losses) == 0.5


def test_barrier_on_bump():
    losses = [1.0, 3.0, 2.0, 0.0]
    alphas = [0.0, 1 / 3, 2 / 3, 1.0]
    # chord: 1, 2/3, 1/3, 0 → excess 0, 7/3, 5/3, 0
    assert barrier_height(alphas, losses) == pytest.approx(7 / 3)
    assert endpoint_barrier(losses) == 3.0 - 0.5


def test_barriers_need_two_points_and_propagate_nan():
    with pytest.raises(ValueError):
        barrier_height([0.0], [1.0])
    with pytest.raises(ValueError):
        endpoint_barrier([1.0])
    assert math.isnan(barrier_height([0, 0.5, 1], [1.0, float("nan"), 0.0]))
    assert math.isnan(endpoint_barrier([1.0, float("nan"), 0.0]))


@FAST
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=30),
    st.floats(-1e3, 1e3, allow_nan=False),
    st.floats(-1e3, 1e3, allow_nan=False),
)
def test_barrier_properties(losses, a, b):
    n = len(losses)
    alphas = [i / (n - 1) for i in range(n)]
    base = barrier_height(alphas, losses)
    assert base >= 0.0 and endpoint_barrier(losses) >= 0.0
    # adding an affine function of α moves the chord with the curve: barrier unchanged
    tilted = [x + a + b * t for x, t in zip(losses, alphas)]
    assert barrier_height(alphas, tilted) == pytest.approx(base, abs=1e-8)
    # equal endpoints: both barriers are max L − L_0
    flat = losses[:-1] + [losses[0]]
    assert barrier_height(alphas, flat) == pytest.approx(max(flat) - flat[0], abs=1e-9)
    assert endpoint_barrier(flat) == pytest.approx(max(flat) - flat[0], abs=1e-9)


# ----------------------------------------------------------------------------- distances


def _pair():
    """Linear(3, 2) + BatchNorm1d(2): start and end with hand-set values."""
    start = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    end = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        start[0].weight.fill_(1.0)  # ‖·‖² = 6
        start[0].bias.zero_()
        start[1].weight.fill_(1.0)  # ‖·‖² = 2
        start[1].bias.zero_()
        # running_mean 0, running_var 1 (defaults): ‖·‖² = 2 if wrongly included
        end[0].weight.copy_(torch.tensor([[2.0, 1.0, 1.0], [1.0, 3.0, 1.0]]))  # diff² 1 + 4
        end[0].bias.copy_(torch.tensor([2.0, 0.0]))  # diff² 4
        end[1].weight.copy_(torch.tensor([1.0, 5.0]))  # diff² 16
        end[1].bias.zero_()
        end[1].running_mean.fill_(100.0)  # excluded
        end[1].running_var.fill_(50.0)  # excluded
        end[1].num_batches_tracked.fill_(7)  # excluded
    return start, end


def test_weight_distance_hand_computed():
    start, end = _pair()
    assert weight_distance(start, end) == pytest.approx(5.0, rel=1e-15)  # sqrt(1+4+4+16)
    assert weight_distance(start.state_dict(), end.state_dict()) == pytest.approx(5.0)
    assert weight_distance(start, end, normalized=True) == pytest.approx(5.0 / math.sqrt(8.0))
    assert weight_distance(end, end) == 0.0


def test_weight_distance_include():
    start, end = _pair()
    only_linear = weight_distance(start, end, include=lambda k: k.startswith("0."))
    assert only_linear == pytest.approx(3.0)  # sqrt(1 + 4 + 4)
    assert weight_distance(start, end, include=["1.weight"]) == pytest.approx(4.0)
    with_running = weight_distance(start, end, include=lambda k: True)
    expected = math.sqrt(25 + 2 * 100.0**2 + 2 * 49.0**2 + 7.0**2)
    assert with_running == pytest.approx(expected)
    with pytest.raises(ValueError, match="neither"):
        weight_distance(start, end, include=["nope"])


def test_weight_distance_is_float64():
    # float32 squares of 1e30 overflow; a float64 sum does not
    s = {"w": torch.zeros(4, dtype=torch.float32)}
    e = {"w": torch.full((4,), 1e30, dtype=torch.float32)}
    x = float(e["w"][0])  # 1e30 rounded to float32
    assert torch.sum(e["w"] ** 2).isinf()  # the float32 computation would overflow
    assert weight_distance(s, e) == pytest.approx(2 * x, rel=1e-15)


def test_weight_distance_mismatched_keys_and_shapes():
    start, _ = _pair()
    extra = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"missing in start: '2\.weight', '2\.bias'"):
        weight_distance(start, extra)
    with pytest.raises(ValueError, match=r"missing in end: '2\.weight'"):
        weight_distance(extra, start)
    wide = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match=r"'0\.weight' \(2, 3\) vs \(2, 4\)"):
        weight_distance(start, wide)
    # a mismatch confined to excluded entries does not matter
    untracked = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False))
    assert weight_distance(start, untracked) >= 0.0
    with pytest.raises(TypeError):
        weight_distance(start, [1, 2])


def test_weight_distance_zero_start_normalized():
    z = {"w": torch.zeros(3)}
    o = {"w": torch.ones(3)}
    assert weight_distance(z, o) == pytest.approx(math.sqrt(3))
    with pytest.raises(ValueError, match="undefined"):
        weight_distance(z, o, normalized=True)


# ----------------------------------------------------------------------------- across runs


def test_fraction_non_monotonic_and_average():
    d = [0.0, 5e-4, 1e-3, 2e-3, 0.5]
    frac = fraction_non_monotonic(d)  # strictly above 1e-3: 2e-3 and 0.5
    assert frac == (0.4, 5)
    assert frac.non_monotonic == 2
    fraction, count = fraction_non_monotonic(d, threshold=0.0)
    assert (fraction, count) == (0.8, 5)
    assert average_bump_height(d) == pytest.approx((2e-3 + 0.5) / 2)
    assert average_bump_height(d, threshold=0.0) == pytest.approx((5e-4 + 1e-3 + 2e-3 + 0.5) / 4)
    assert average_bump_height([0.0, 0.0]) == 0.0
    f0 = fraction_non_monotonic([])
    assert math.isnan(f0.fraction) and f0.count == 0
    with pytest.raises(ValueError, match="NaN"):
        fraction_non_monotonic([0.1, float("nan")])
    with pytest.raises(ValueError):
        average_bump_height([-0.1])


def test_summarize():
    start, end = _pair()
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 0.0, 0.5, 0.25, 0.75]
    s = summarize(alphas, losses, start, end)
    assert s.n_points == 5 and not s.is_monotonic
    assert s.delta_min == 0.75 and s.max_step_increase == 0.5
    assert len(s.bumps) == 1 and s.bumps[0].height == 0.75
    # max L is L_0 = 1: endpoint barrier 1 − (1 + 0.75)/2; the chord 1 → 0.75 lies above
    # every interior point, so the chord barrier is 0 although the curve is non-monotonic
    assert s.endpoint_barrier == 0.125 and s.barrier_height == 0.0
    assert s.loss_start == 1.0 and s.loss_end == 0.75
    assert s.weight_distance == pytest.approx(5.0)
    assert s.normalized_weight_distance == pytest.approx(5.0 / math.sqrt(8.0))
    assert summarize(alphas, losses).weight_distance is None


def test_summarize_an_extended_grid_on_its_segment():
    alphas = np.linspace(-0.3, 1.3, 17)  # (−0.3 + 3 · 0.1 is not exactly 0)
    losses = (alphas - 1.0) ** 2 + 0.1  # decreasing on [0, 1], rising on either side of it
    s = summarize(alphas, losses)
    assert s.is_monotonic and s.delta_min == 0.0 and s.n_points == 11
    assert s.loss_start == pytest.approx(1.1) and s.loss_end == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"two points with α in \[0, 1\]"):
        summarize([-1.0, 0.5, 2.0], [1.0, 2.0, 3.0])
    in_float32 = torch.linspace(-0.3, 1.3, 17).double().numpy()  # (its zero is −3e-8)
    assert summarize(in_float32, (in_float32 - 1.0) ** 2 + 0.1).n_points == 11


def test_summarize_nan_curve_and_report():
    s = summarize([0.0, 0.5, 1.0], [1.0, float("nan"), 0.5])
    assert s.bumps is None and not s.is_monotonic and math.isnan(s.delta_min)

    class FakeResults:  # duck-typed stand-in for mlifast's Results along a line
        alphas = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

        def __getitem__(self, key):
            return {"loss": torch.tensor([1.0, 2.0, 0.5]), "acc": torch.tensor([0.0, 0.5, 1.0])}[key]

    r = mli.report(FakeResults())
    assert r.delta_min == 1.0 and r.bumps == (Bump(0.0, 1.0, 1.0, 0, 2, True),)
    assert mli.report(FakeResults(), key="acc").delta_min == 1.0
    with pytest.raises(TypeError, match="alphas"):
        mli.report({"loss": [1.0]})


def test_public_names():
    import mlifast.analysis as analysis

    for name in mli.__all__:
        assert getattr(analysis, name) is getattr(mli, name)


def test_report_table_and_json():
    import json

    import torch

    from mlifast.engine import Results

    res = Results(torch.linspace(0, 1, 5, dtype=torch.float64)[:, None],
                  {"loss": torch.tensor([1.0, 0.0, 0.5, 0.2, 0.7], dtype=torch.float64)})
    summary = mli.report(res, gauss_length=1.25)
    text = summary.table()
    assert "\nΔ_min                        0.7\n" in text and text.endswith("Gauss length (rad)           1.25")
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["delta_min"] == pytest.approx(0.7) and data["gauss_length"] == 1.25
    assert data["bumps"][0]["height"] == pytest.approx(0.7)  # 0 → 0.5 → 0.2 → 0.7: one bump
