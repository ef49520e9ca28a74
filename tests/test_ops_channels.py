"""channel_moments, channel_affine and channel_combine: compiled kernels vs their
references vs a float64 loop over the points, in every input layout, vector width and
thread count."""
import pytest
import torch

import mlifast
from mlifast.ops import (channel_affine, channel_affine_reference, channel_combine, channel_combine_reference,
                         channel_moments, channel_moments_reference)

LAYOUTS = {  # name: (shape, make the layout)
    "channels-last": ((6, 5, 7, 3), lambda t: t.contiguous(memory_format=torch.channels_last)),
    "contiguous images": ((6, 5, 7, 3), lambda t: t.contiguous()),
    "channels-last 3d": ((6, 3, 2, 5, 3), lambda t: t.contiguous(memory_format=torch.channels_last_3d)),
    "rows": ((12, 70), lambda t: t.contiguous()),  # (N, C): more channels than one block of 64
    "sequences": ((6, 4, 37), lambda t: t.contiguous()),  # (N, C, L): runs longer than 16 values
    "strided": ((6, 5, 7, 6), lambda t: t[..., ::2]),  # neither layout: made contiguous first
    # every other row and column of channels-last images: copied to channels-last first
    "subsampled channels-last": ((6, 5, 8, 6), lambda t: t.contiguous(memory_format=torch.channels_last)[:, :, ::2, ::2]),
}


def loop_moments(x: torch.Tensor, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point, float64 mean and biased variance over every dimension but the channels."""
    means, variances = [], []
    for rows in x.double().chunk(points):
        values = rows.transpose(0, 1).reshape(rows.shape[1], -1)
        means.append(values.mean(1))
        variances.append(((values - values.mean(1, keepdim=True)) ** 2).mean(1))
    return torch.stack(means), torch.stack(variances)


def loop_affine(x, scale, shift, addend, relu):
    outs = []
    for k, rows in enumerate(x.double().chunk(scale.shape[0])):
        view = (1, -1, *([1] * (x.dim() - 2)))
        outs.append(rows * scale[k].double().reshape(view) + shift[k].double().reshape(view))
    y = torch.cat(outs) + (0 if addend is None else addend.double())
    return y.clamp_min(0) if relu else y


def inputs(layout: str, dtype: torch.dtype, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    shape, make = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    return make(torch.randn(*shape, generator=g, dtype=torch.float64).mul(3).add(offset).to(dtype))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def test_cpp_kernels_are_built():
    ops = mlifast.info()["ops"]
    assert all(ops[name]["cpu"] == "cpp" for name in ("channel_moments", "channel_affine", "channel_combine")), ops


@pytest.mark.parametrize("vector_bytes", [None, "32", "16"])
@pytest.mark.parametrize("points", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_equal_the_loop(dtype, layout, points, vector_bytes, monkeypatch):
    """Mean and biased variance per point and channel, far from 0 too (a mean of 1000 at a
    standard deviation of 3: sums about a pivot keep float32's variance exact to 1e-5)."""
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for offset in (0.0, 1000.0):
        x = inputs(layout, dtype, offset=offset)
        mean, var = channel_moments(x, points)
        expected_mean, expected_var = loop_moments(x, points)
        assert mean.shape == var.shape == (points, x.shape[1]) and mean.dtype == var.dtype == dtype
        assert rel_err(mean, expected_mean) < tol and rel_err(var, expected_var) < tol, (offset, layout)
        reference_mean, reference_var = channel_moments_reference(x, points)
        assert rel_err(reference_mean, expected_mean) < tol and rel_err(reference_var, expected_var) < tol


@pytest.mark.parametrize("vector_bytes", [None, "16"])
@pytest.mark.parametrize("layout", ["rows", "channels-last", "sequences"])
def test_float32_moments_keep_their_precision_away_from_the_first_value(layout, vector_bytes, monkeypatch):
    """Each block's deviations are summed about its own mean and the blocks merged in
    float64: a first value 1000 standard deviations from the mean, or a mean of 2000 at a
    deviation of 10 whose first value is 0, leave the float32 variance as exact as ATen's
    (sums about the first value lost 1.5e-4 relative)."""
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    g = torch.Generator().manual_seed(3)
    shape = {"rows": (2**16, 4), "channels-last": (256, 4, 16, 16), "sequences": (64, 4, 1024)}[layout]
    for scale, offset, first in ((1.0, 0.0, 1000.0), (10.0, 2000.0, 0.0)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64).mul(scale).add(offset).float()
        x.view(-1)[0] = first  # (point 0's first value of channel 0)
        if layout == "channels-last":
            x = x.contiguous(memory_format=torch.channels_last)
        mean, var = channel_moments(x, 2)
        expected_mean, expected_var = loop_moments(x, 2)
        assert rel_err(mean, expected_mean) < 1e-6 and ((var.double() - expected_var) / expected_var).abs().max() < 1e-6


@pytest.mark.parametrize("vector_bytes", [None, "32", "16"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("addend", [None, "same layout", "other layout"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_equals_the_loop_in_the_input_layout(dtype, layout, addend, relu, vector_bytes, monkeypatch):
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    x = inputs(layout, dtype)
    g = torch.Generator().manual_seed(1)
    points, channels = 3, x.shape[1]
    scale, shift = (torch.randn(points, channels, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    added = None if addend is None else inputs(layout, dtype, seed=2)
    if addend == "other layout":
        added = added.clone(memory_format=torch.contiguous_format).transpose(0, 1).contiguous().transpose(0, 1)
    y = channel_affine(x, scale, shift, added, relu)
    expected = loop_affine(x, scale, shift, added, relu)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert y.shape == x.shape and y.dtype == dtype and rel_err(y, expected) < tol
    assert rel_err(channel_affine_reference(x, scale, shift, added, relu), expected) < tol
    if x.is_contiguous() or layout.startswith("channels-last"):
        assert y.stride() == x.stride()  # (the layout kept)
    if layout == "subsampled channels-last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_the_threads_change_no_bit():
    x = inputs("channels-last", torch.float32, offset=10.0).repeat(400, 1, 1, 1)  # 2,400 × 21 rows
    scale, shift = torch.rand(4, 5), torch.rand(4, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = channel_moments(x, 4), channel_affine(x, scale, shift, None, True)
        torch.set_num_threads(max(2, threads))
        several = channel_moments(x, 4), channel_affine(x, scale, shift, None, True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip((*single[0], single[1]), (*several[0], several[1])))


@pytest.mark.parametrize("vector_bytes", [None, "16"])
def test_float32_moments_of_small_points_and_huge_spreads(vector_bytes, monkeypatch):
    """Points of one 64-row block each (plain normal data: the block's first row, the
    pivot, is often a few deviations out), a channel whose first row is 4.4 deviations out,
    and a spread whose squares overflow float32 (σ = 1.5e18: a variance of 3e36 that
    float32 holds): within 1e-6 of float64, and never inf."""
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    g = torch.Generator().manual_seed(4)
    small = torch.randn(16, 64, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    one = torch.randn(64 * 8, 1, generator=g)
    one[::64] = one[::64].sign() * 4.4
    huge = (torch.randn(64 * 50, 4, generator=g, dtype=torch.float64) * 1.5e18).float()
    for x, points in ((small, 16), (one, 8), (huge, 50)):
        mean, var = channel_moments(x, points)
        expected_mean, expected_var = loop_moments(x, points)
        assert torch.isfinite(var).all() and ((var.double() - expected_var) / expected_var).abs().max() < 1e-6
        assert ((mean.double() - expected_mean).abs() / expected_var.sqrt()).max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_channels_have_no_variance(dtype):
    """A constant channel's variance is 0 up to rounding, never negative, and a huge
    constant (1e30 in float32, 1e200 in float64) gives 0, not inf or NaN."""
    for value in (0.1, 3.0, -7.25, 1e30 if dtype == torch.float32 else 1e200):
        x = torch.full((1000, 3), value, dtype=dtype)
        mean, var = channel_moments(x, 2)
        assert (var >= 0).all() and torch.isfinite(var).all() and (var.sqrt() <= abs(value) * 1e-6).all(), (value, var)
        assert ((mean - value).abs() <= abs(value) * 1e-6).all()


def test_nan_stays_nan():
    x = inputs("channels-last", torch.float32)
    x[2, 2, 1, 1] = float("nan")  # point 1 (of 3, rows 2 and 3), channel 2
    mean, var = channel_moments(x, 3)
    assert mean[1, 2].isnan() and var[1, 2].isnan() and not mean[0].isnan().any() and not mean[1, :2].isnan().any()
    y = channel_affine(x, torch.ones(3, 5), torch.full((3, 5), -100.0), None, relu=True)
    assert y[2, 2, 1, 1].isnan() and (y.nan_to_num() == 0).all()


def test_bad_arguments_say_what_is_wrong():
    x = inputs("channels-last", torch.float32)
    with pytest.raises(ValueError, match="holding 4 points"):
        channel_moments(x, 4)
    with pytest.raises(TypeError, match="float32 or float64"):
        channel_moments(x.bfloat16(), 3)
    with pytest.raises(ValueError, match=r"scale and shift of shape \(K, 5\)"):
        channel_affine(x, torch.ones(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"scale and shift of shape \(K, 5\)"):
        channel_affine(x, torch.ones(5), torch.ones(5))
    with pytest.raises(TypeError, match="shift must have input's dtype"):
        channel_affine(x, torch.ones(3, 5), torch.ones(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="addend must have input's shape"):
        channel_affine(x, torch.ones(3, 5), torch.ones(3, 5), x[:3])
    with pytest.raises(RuntimeError, match="no derivatives"):
        channel_affine(x, torch.ones(3, 5, requires_grad=True), torch.ones(3, 5))


@pytest.mark.parametrize("layout", ["channels-last", "contiguous images", "permuted"])
def test_opcheck_and_the_output_layout(layout):
    """The kernel, its reference and its fake kernel return the same strides: the input's
    where it is contiguous or channels-last, else contiguous (a dense permutation too)."""
    x = torch.randn(6, 5, 3, 7).permute(0, 2, 3, 1) if layout == "permuted" else inputs(layout, torch.float32)
    scale, shift = torch.rand(3, x.shape[1]), torch.rand(3, x.shape[1])
    torch.library.opcheck(torch.ops.mlifast.channel_moments.default, (x, 3))
    torch.library.opcheck(torch.ops.mlifast.channel_affine.default, (x, scale, shift, x, True))
    y = channel_affine(x, scale, shift)
    assert y.stride() == channel_affine_reference(x, scale, shift).stride()
    assert y.stride() == (x.stride() if layout != "permuted" else x.contiguous().stride())


def loop_combine(products, scales, shift, relu):
    """Per point k, float64 Σ_j products[j]·scales[k, j] + shift[k] per channel (K·B, C, …)."""
    view = (1, -1, *([1] * (products[0].dim() - 2)))
    outs = [sum(u.double() * scales[k, j].double().reshape(view) for j, u in enumerate(products))
            + shift[k].double().reshape(view) for k in range(scales.shape[0])]
    y = torch.cat(outs)
    return y.clamp_min(0) if relu else y


@pytest.mark.parametrize("vector_bytes", [None, "16"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("inputs_", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_equals_the_loop_in_the_inputs_layout(dtype, layout, inputs_, relu, vector_bytes, monkeypatch):
    """Every point's rows, point-major, in the first input's layout where the kernels read
    it in place (else contiguous); a second input in another layout is read as well."""
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    products = [inputs(layout, dtype, seed=j) for j in range(inputs_)]
    if inputs_ > 1:
        products[1] = products[1].clone(memory_format=torch.contiguous_format).transpose(0, 1).contiguous().transpose(0, 1)
    g = torch.Generator().manual_seed(1)
    points, channels = 4, products[0].shape[1]
    scales = torch.randn(points, inputs_, channels, generator=g, dtype=torch.float64).to(dtype)
    shift = torch.randn(points, channels, generator=g, dtype=torch.float64).to(dtype)
    y = channel_combine(products, scales, shift, relu)
    expected = loop_combine(products, scales, shift, relu)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert y.shape == expected.shape and y.dtype == dtype and rel_err(y, expected) < tol
    reference = channel_combine_reference(products, scales, shift, relu)
    assert rel_err(reference, expected) < tol and y.stride() == reference.stride()
    if layout.startswith("channels-last"):
        assert not y.is_contiguous() and y[:6].stride() == products[0].stride()
    if layout == "subsampled channels-last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_combine_keeps_nan_changes_no_bit_with_the_threads_and_passes_opcheck():
    x = inputs("channels-last", torch.float32, offset=10.0).repeat(400, 1, 1, 1)  # 2,400 × 21 rows
    u = inputs("channels-last", torch.float32, seed=3).repeat(400, 1, 1, 1)
    x[7, 2, 1, 1] = float("nan")
    scales, shift = torch.rand(3, 2, 5), torch.full((3, 5), -100.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = channel_combine([x, u], scales, shift, True)
        torch.set_num_threads(max(2, threads))
        several = channel_combine([x, u], scales, shift, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single.nan_to_num(-1), several.nan_to_num(-1))
    for k in range(3):  # the NaN in every point's rows, the rest ReLU'd to 0
        assert single[k * 2400 + 7, 2, 1, 1].isnan()
    assert single.isnan().sum() == 3 and (single.nan_to_num() == 0).all()
    clean = x[:12].nan_to_num()  # (opcheck compares outputs: NaN ≠ NaN)
    torch.library.opcheck(torch.ops.mlifast.channel_combine.default, ([clean, u[:12]], scales, shift, True))


def test_combine_bad_arguments_say_what_is_wrong():
    x = inputs("channels-last", torch.float32)
    scales, shift = torch.ones(3, 2, 5), torch.ones(3, 5)
    with pytest.raises(ValueError, match="expected 1 to 8 inputs, got 0"):
        channel_combine([], scales, shift)
    with pytest.raises(ValueError, match="expected 1 to 8 inputs, got 9"):
        channel_combine([x] * 9, torch.ones(3, 9, 5), shift)
    with pytest.raises(ValueError, match=r"inputs\[1\] must have inputs\[0\]'s shape"):
        channel_combine([x, x[:3]], scales, shift)
    with pytest.raises(TypeError, match=r"inputs\[1\] is None"):
        channel_combine([x, None], scales, shift)
    with pytest.raises(ValueError, match=r"expected scales \(K, 2, 5\) and shift \(K, 5\)"):
        channel_combine([x, x], torch.ones(3, 5), shift)
    with pytest.raises(ValueError, match=r"expected scales \(K, 2, 5\) and shift \(K, 5\)"):
        channel_combine([x, x], scales, torch.ones(2, 5))
    with pytest.raises(TypeError, match="scales must have the inputs' dtype"):
        channel_combine([x, x], scales.double(), shift)
    with pytest.raises(TypeError, match="float32 or float64"):
        channel_combine([x.bfloat16()], torch.ones(3, 1, 5, dtype=torch.bfloat16), shift.bfloat16())
    with pytest.raises(RuntimeError, match="no derivatives"):
        channel_combine([x, x], scales.requires_grad_(), shift)
    with pytest.raises(RuntimeError, match="expected inputs of one shape"):  # the kernel's own check
        torch.ops.mlifast.channel_combine([x, x[:3]], scales.detach(), shift)


def test_combine_of_a_large_mean_is_as_accurate_as_channel_affine():
    """shift + u·scale with shift ≈ −mean·scale (a batch norm folded into images far from
    0): the shift first, so that u·scale is not rounded before it cancels; within 4× of
    channel_affine's error (the shift added last: 280×). (The second review's finding.)"""
    g = torch.Generator().manual_seed(0)
    u = (1000 + torch.randn(16, 8, 8, 8, generator=g)).contiguous(memory_format=torch.channels_last)
    scale = torch.full((1, 8), 0.7)
    shift = -1000 * scale
    exact = u.double() * scale.double()[:, :, None, None] + shift.double()[:, :, None, None]
    err = lambda y: ((y.double() - exact).abs().max() / exact.abs().max()).item()  # noqa: E731
    affine_err = err(channel_affine(u, scale, shift, None, False))
    for combine in (channel_combine, channel_combine_reference):
        assert err(combine([u], scale.unsqueeze(1), shift)) <= 4 * affine_err + 1e-7
