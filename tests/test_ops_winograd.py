"""winograd_conv3x3: the compiled F(4×4, 3×3) kernel vs a float64 convolution, in every
vector width, at sizes that leave partial tiles and blocks that cross images; its errors; and
its use by the multi-point model's convolutions (float32 ResNet-20 at width 16)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

import mlifast
from mlifast.analysis.geometry import gauss_length
from mlifast.multipoint import pending
from mlifast.ops._checks import carries_derivatives
from mlifast.ops import channel_affine, winograd_conv3x3, winograd_conv3x3_reference
from models import ResNet20
from oracle import rel_err
from test_interpolate import check_parity, pair

# (N, C_in, C_out, H, W, padding): partial tiles at the right and bottom; 1 × 1 outputs;
# padding 0 and 2; blocks of 48 tiles that span images; an image of more than one block;
# each register blocking of the GEMMs and each kind of input stride.
GEOMETRIES = [
    (2, 16, 16, 8, 8, (1, 1)),
    (3, 32, 16, 7, 9, (1, 1)),
    (1, 16, 48, 5, 6, (0, 0)),
    (2, 16, 32, 3, 3, (2, 1)),
    (1, 16, 16, 3, 3, (0, 0)),
    (5, 16, 16, 13, 11, (1, 1)),
    (1, 16, 16, 30, 30, (1, 1)),
    (2, 64, 64, 6, 6, (1, 1)),  # 4 vectors of output channels a GEMM step (at 64 bytes)
    (2, 48, 80, 9, 7, (1, 1)),  # input rows padded to 64 floats; 80 = 5 vectors
    (1, 144, 64, 6, 10, (2, 0)),
    (1, 528, 16, 5, 5, (1, 1)),  # input rows beyond 512 floats: the stride the GEMM reads at run time
]
POST_OPS = {"none": (False, False), "relu": (False, True), "addend": (True, False), "addend+relu": (True, True)}
WINOGRAD_OUT = torch.ops.mlifast.winograd_conv3x3.out
TOL = 2e-5  # of the largest output (measured: 1.5–3.7e-6; ATen's direct convolution 2–5e-7)


def operands(n, c_in, c_out, h, w, padding, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5
    b = torch.randn(c_out, generator=g) if bias else None
    addend = torch.randn(n, c_out, h + 2 * padding[0] - 2, w + 2 * padding[1] - 2, generator=g)
    return x, weight, b, addend


def float64_conv(x, weight, bias, padding, addend, relu):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=padding)
    y = y if addend is None else y + addend.double()
    return y.clamp_min(0) if relu else y


def test_cpp_kernel_is_built():
    assert mlifast.info()["ops"]["winograd_conv3x3"]["cpu"] == "cpp"


@pytest.mark.parametrize("vector_bytes", [None, "32", "16"])
@pytest.mark.parametrize("post", POST_OPS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_equals_a_float64_convolution(geometry, post, vector_bytes, monkeypatch):
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    with_addend, relu = POST_OPS[post]
    x, weight, bias, addend = operands(*geometry, bias=post != "none")
    addend = addend if with_addend else None
    padding = geometry[-1]
    with torch.no_grad():
        y = winograd_conv3x3(x, weight, bias, padding, addend, relu)
    expected = float64_conv(x, weight, bias, padding, addend, relu)
    assert y.shape == expected.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, expected) < TOL
    assert rel_err(winograd_conv3x3_reference(x, weight, bias, padding, addend, relu), expected) < TOL


def test_layouts_of_input_and_addend_do_not_matter():
    x, weight, bias, addend = operands(2, 16, 32, 9, 6, (1, 1))
    with torch.no_grad():
        y = winograd_conv3x3(x, weight, bias, (1, 1), addend, True)
        assert torch.equal(winograd_conv3x3(x.contiguous(), weight, bias, (1, 1),
                                            addend.contiguous(memory_format=torch.channels_last), True), y)
        strided = torch.randn(2, 16, 9, 12)[..., ::2].copy_(x)  # neither layout
        assert torch.equal(winograd_conv3x3(strided, weight, bias, (1, 1), addend, True), y)


def test_out_takes_a_slice_of_a_larger_output_and_may_be_the_addend():
    x, weight, bias, addend = operands(3, 16, 32, 9, 6, (1, 1))
    with torch.no_grad():
        y = winograd_conv3x3(x, weight, bias, (1, 1), addend, True)
        into = torch.full((5, *y.shape[1:]), float("nan")).contiguous(memory_format=torch.channels_last)
        assert winograd_conv3x3(x, weight, bias, (1, 1), addend, True, out=into[1:4]).data_ptr() == into[1:4].data_ptr()
        assert torch.equal(into[1:4], y) and into[0].isnan().all() and into[4].isnan().all()
        in_place = addend.contiguous(memory_format=torch.channels_last)
        version = in_place._version
        winograd_conv3x3(x, weight, bias, (1, 1), in_place, True, out=in_place)
        assert torch.equal(in_place, y) and in_place._version > version  # (autograd sees the write)
        shifted = torch.cat([addend, addend]).contiguous(memory_format=torch.channels_last)
        with pytest.raises(RuntimeError, match="unsupported operation"):  # (an addend partly out)
            winograd_conv3x3(x, weight, bias, (1, 1), shifted[:3], out=shifted[1:4])
        with pytest.raises(RuntimeError, match="unsupported operation"):  # (a bias inside out)
            winograd_conv3x3(x, weight, into[0, :, 0, 0], (1, 1), out=into[:3])
        with pytest.raises(RuntimeError, match="out must be a channels-last float32 CPU tensor"):
            winograd_conv3x3(x, weight, bias, (1, 1), out=torch.empty(y.shape))
        same = torch.empty(3, 16, 9, 6).contiguous(memory_format=torch.channels_last)
        with pytest.raises(RuntimeError, match="unsupported operation"):  # (out overlaps the input)
            winograd_conv3x3(same, weight[:16], bias[:16], (1, 1), out=same)
        into_out = torch.empty(3, 16, 9, 6).contiguous(memory_format=torch.channels_last)
        moments = torch.empty(0, dtype=torch.float64).set_(into_out.untyped_storage(), 0, (2, 16))
        with pytest.raises(RuntimeError, match="unsupported operation"):  # (moments, written last, inside out)
            winograd_conv3x3(torch.randn_like(same), weight[:16], bias[:16], (1, 1), out=into_out, moments=moments)
    # (functionalization takes no custom op returning an alias, as torch's .out ops do)
    torch.library.opcheck(torch.ops.mlifast.winograd_conv3x3.out, (x, weight, bias, [1, 1], addend, True),
                          {"out": torch.empty_like(y)}, test_utils=("test_schema", "test_faketensor"))


def float64_moments(y):
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    return mean, var


@pytest.mark.parametrize("vector_bytes", [None, "32", "16"])
@pytest.mark.parametrize("post", ["none", "addend+relu"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_moments_are_the_outputs_mean_and_variance(geometry, post, vector_bytes, monkeypatch):
    """`moments` receives the per-channel mean and biased variance of what the kernel wrote
    (after the addend and ReLU), against float64 statistics of its own output: every way
    blocks and tiles cut the output, channel counts of 1 to 5 vectors."""
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    n, c_in, c_out, h, w, padding = geometry
    x, weight, bias, addend = operands(n, c_in, c_out, h, w, padding)
    with_addend, relu = POST_OPS[post]
    moments = torch.full((2, c_out), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        y = winograd_conv3x3(x, weight, bias, padding, addend if with_addend else None, relu, moments=moments)
        plain = winograd_conv3x3(x, weight, bias, padding, addend if with_addend else None, relu)
    assert torch.equal(y, plain)  # (gathering them changes nothing written)
    mean, var = float64_moments(y)
    assert (moments[0] - mean).abs().max() <= 1e-6 * mean.abs().max().clamp_min(1)
    assert ((moments[1] - var).abs() <= 1e-6 * var + 1e-12).all()


def test_moments_keep_the_variance_under_a_large_mean():
    """Outputs near 1000 with a spread near 1: Σx² − n·x̄² in float32 would lose the
    variance; the two passes about the block's mean keep it to float32's rounding."""
    x, weight, bias, _ = operands(8, 16, 32, 16, 16, (1, 1))
    moments = torch.empty(2, 32, dtype=torch.float64)
    with torch.no_grad():
        y = winograd_conv3x3(x, weight, bias + 1000, (1, 1), moments=moments)
    mean, var = float64_moments(y)
    assert ((moments[1] - var).abs() <= 1e-6 * var).all() and (moments[0] - mean).abs().max() < 1e-7 * 1000


def test_moments_of_constant_channels_are_exactly_zero_variance_and_sums_beyond_float_are_kept():
    """Outputs equal in each channel (a zero weight, biases up to 1e6): variance 0, never
    below (a batch norm's rsqrt(var + eps) would be NaN); outputs near 3e37, whose float
    sums overflow: the block is summed again in float64."""
    x = torch.randn(3, 16, 9, 13).contiguous(memory_format=torch.channels_last)
    bias = torch.logspace(0, 6, 16) * 1.2345
    moments = torch.empty(2, 16, dtype=torch.float64)
    with torch.no_grad():
        y = winograd_conv3x3(x, torch.zeros(16, 16, 3, 3), bias, 1, moments=moments)
    assert torch.equal(moments[1], torch.zeros(16, dtype=torch.float64))
    assert torch.equal(moments[0], float64_moments(y)[0])
    huge = torch.full((16,), 3e37)
    huge[::2] = -1e37
    with torch.no_grad():
        y = winograd_conv3x3(x, torch.zeros(16, 16, 3, 3), huge, 1, moments=moments)
    assert y.isfinite().all() and torch.equal(moments[0], float64_moments(y)[0]) and not moments[1].any()


def test_moments_written_bump_their_version():
    """A write into `moments` is seen as one (autograd's saved tensors, a pending result's
    inputs), as a write into `out` is."""
    x, weight, bias, _ = operands(2, 16, 16, 8, 8, (1, 1))
    out, moments = torch.empty(2, 16, 8, 8).contiguous(memory_format=torch.channels_last), \
        torch.zeros(3, 2, 16, dtype=torch.float64)
    before = out._version, moments._version
    WINOGRAD_OUT(x, weight, bias, [1, 1], None, False, out=out, moments=moments[1])
    assert (out._version, moments._version) == (before[0] + 1, before[1] + 1)


def test_the_out_op_itself_refuses_tensors_that_require_grad():
    """Called directly (not through the face), `.out` refuses a tensor that requires grad
    while grad mode is on: its derivative would silently be wrong."""
    x, weight, bias, _ = operands(2, 16, 16, 8, 8, (1, 1))
    out = torch.empty(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    moments = torch.zeros(2, 16, dtype=torch.float64, requires_grad=True) * 2
    with pytest.raises(RuntimeError, match="no derivatives, and moments requires grad"):
        WINOGRAD_OUT(x, weight, bias, [1, 1], None, False, out=out, moments=moments)
    with pytest.raises(RuntimeError, match="no derivatives, and weight requires grad"):
        WINOGRAD_OUT(x, weight.requires_grad_(), bias, [1, 1], None, False, out=out)
    with torch.no_grad():
        WINOGRAD_OUT(x, weight, bias, [1, 1], None, False, out=out, moments=moments)


def test_the_same_bits_on_one_and_two_threads_into_slices():
    """The outputs, and the moments (each block's merged in block order), do not depend on
    the thread count by a bit. `out` and `moments` may be slices of larger tensors (a
    point's rows and statistics)."""
    x, weight, bias, addend = operands(4, 32, 32, 16, 16, (1, 1))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out, moments = torch.empty(8, 32, 16, 16).contiguous(memory_format=torch.channels_last), \
                torch.zeros(3, 2, 32, dtype=torch.float64)
            with torch.no_grad():
                WINOGRAD_OUT(x, weight, bias, [1, 1], addend, True, out=out[4:], moments=moments[1])
            results.append((out[4:], moments))
    finally:
        torch.set_num_threads(threads)
    (out, moments), (out_2, moments_2) = results
    assert torch.equal(out, out_2) and torch.equal(moments, moments_2) and not moments[0].any() and not moments[2].any()
    mean, var = float64_moments(out)
    assert torch.allclose(moments[1, 0], mean, rtol=1e-6, atol=1e-7) and torch.allclose(moments[1, 1], var, rtol=1e-6)


def test_moments_of_a_nan_channel_are_nan_and_the_others_are_kept():
    x, weight, bias, _ = operands(2, 16, 16, 8, 8, (1, 1))
    bias[3] = float("nan")
    moments = torch.empty(2, 16, dtype=torch.float64)
    with torch.no_grad():
        winograd_conv3x3(x, weight, bias, (1, 1), moments=moments)
    assert moments[:, 3].isnan().all() and not moments[:, [0, 1, 2, *range(4, 16)]].isnan().any()


def test_opcheck_with_moments():
    x, weight, bias, addend = operands(2, 16, 16, 6, 7, (1, 2))
    out = torch.empty_like(addend, memory_format=torch.channels_last)
    torch.library.opcheck(WINOGRAD_OUT, (x, weight, bias, [1, 2], addend, True),
                          {"out": out, "moments": torch.empty(2, 16, dtype=torch.float64)},
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("vector_bytes", [None, "16"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[i] for i in (1, 5, 7, 9)], ids=str)
def test_a_weight_of_k_points_is_k_calls_in_one(geometry, vector_bytes, monkeypatch):
    """A (K, C_out, C_in, 3, 3) weight: point k's weight (bias, input map, moments) on images
    [k·N/K, (k+1)·N/K): the same bits as K calls, addend and ReLU included, and the
    reference agrees."""
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    n, c_in, c_out, h, w, padding = geometry
    k = 3
    parts = [operands(n, c_in, c_out, h, w, padding, seed=s) for s in range(k)]
    x, addend = torch.cat([p[0] for p in parts]), torch.cat([p[3] for p in parts])
    weight, bias = torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts])
    g = torch.Generator().manual_seed(5)
    scale, shift = torch.rand(k, c_in, generator=g) + 0.5, torch.randn(k, c_in, generator=g)
    moments = torch.empty(k, 2, c_out, dtype=torch.float64)
    with torch.no_grad():
        y = winograd_conv3x3(x, weight, bias, padding, addend, True, input_scale=scale, input_shift=shift,
                             input_relu=True, moments=moments)
        one = torch.empty(2, c_out, dtype=torch.float64)
        for p in range(k):
            rows = slice(p * n, (p + 1) * n)
            expected = winograd_conv3x3(x[rows], weight[p], bias[p], padding, addend[rows], True, input_scale=scale[p],
                                        input_shift=shift[p], input_relu=True, moments=one)
            assert torch.equal(y[rows], expected) and torch.equal(moments[p], one)
    reference = winograd_conv3x3_reference(x, weight, bias, padding, addend, True, scale, shift, True)
    assert rel_err(y, reference) < TOL


def test_a_weight_of_k_points_passes_opcheck():
    parts = [operands(2, 16, 16, 6, 7, (1, 2), seed=s) for s in range(2)]
    x, addend = torch.cat([p[0] for p in parts]), torch.cat([p[3] for p in parts])
    weight, bias = torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts])
    torch.library.opcheck(torch.ops.mlifast.winograd_conv3x3.default, (x, weight, bias, [1, 2], addend, True))
    torch.library.opcheck(WINOGRAD_OUT, (x, weight, bias, [1, 2], addend, True),
                          {"out": torch.empty_like(addend, memory_format=torch.channels_last),
                           "moments": torch.empty(2, 2, 16, dtype=torch.float64)},
                          test_utils=("test_schema", "test_faketensor"))


def test_a_nan_stays_in_its_image():
    """A NaN pixel makes NaN every output whose tile reads it (more than a direct
    convolution's 3 × 3 neighbourhood: the transforms mix a whole 6 × 6 input tile), and no
    output of another image."""
    x, weight, bias, _ = operands(2, 16, 16, 8, 8, (1, 1))
    x[1, 3, 4, 5] = float("nan")
    with torch.no_grad():
        y = winograd_conv3x3(x, weight, bias, (1, 1))
    direct = F.conv2d(x, weight, bias, padding=1)
    assert not y[0].isnan().any()
    assert y[1].isnan()[direct[1].isnan()].all() and y[1].isnan().any()


@pytest.mark.parametrize("vector_bytes", [None, "32", "16"])
@pytest.mark.parametrize("input_relu", [False, True])
@pytest.mark.parametrize("geometry", [GEOMETRIES[i] for i in (0, 2, 3, 5, 8)], ids=str)
def test_an_input_map_is_the_affine_pass_before_the_convolution(geometry, input_relu, vector_bytes, monkeypatch):
    """relu?(input·scale + shift) per input channel in the input step, the padding zeros of
    the mapped input (a shift ≠ 0 tells): against float64, and the same bits as
    channel_affine's pass followed by the convolution."""
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    x, weight, bias, addend = operands(*geometry)
    g = torch.Generator().manual_seed(9)
    scale, shift = torch.randn(x.shape[1], generator=g), torch.randn(x.shape[1], generator=g)
    padding = geometry[-1]
    with torch.no_grad():
        y = winograd_conv3x3(x, weight, bias, padding, addend, True, input_scale=scale, input_shift=shift,
                             input_relu=input_relu)
        mapped = channel_affine(x, scale[None], shift[None], None, input_relu)
        assert torch.equal(y, winograd_conv3x3(mapped, weight, bias, padding, addend, True))
    mapped64 = x.double() * scale.double()[:, None, None] + shift.double()[:, None, None]
    expected = float64_conv(mapped64.clamp_min(0) if input_relu else mapped64, weight, bias, padding, addend, True)
    assert rel_err(y, expected) < TOL
    reference = winograd_conv3x3_reference(x, weight, bias, padding, addend, True, scale, shift, input_relu)
    assert rel_err(reference, expected) < TOL


def test_an_input_relu_alone():
    x, weight, bias, _ = operands(2, 16, 32, 9, 8, (1, 1))
    with torch.no_grad():
        assert torch.equal(winograd_conv3x3(x, weight, bias, input_relu=True),
                           winograd_conv3x3(torch.relu(x), weight, bias))


def test_opcheck_and_the_fake_kernel():
    x, weight, bias, addend = operands(2, 16, 16, 6, 7, (1, 2))
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    torch.library.opcheck(torch.ops.mlifast.winograd_conv3x3.default, (x, weight, bias, [1, 2], addend, True))
    torch.library.opcheck(torch.ops.mlifast.winograd_conv3x3.default, (x, weight, None, [0, 0], None, False))
    torch.library.opcheck(torch.ops.mlifast.winograd_conv3x3.default,
                          (x, weight, bias, [1, 2], None, False, scale, shift, True))


def test_an_int_padding_and_a_string_one():
    x, weight, bias, _ = operands(1, 16, 16, 5, 5, (2, 2))
    with torch.no_grad():
        assert torch.equal(winograd_conv3x3(x, weight, bias, 2), winograd_conv3x3(x, weight, bias, (2, 2)))
    for padding in ("same", 1.5, (1, 1.0), (1, 1, 1)):
        with pytest.raises(ValueError, match=r"int or \(rows, columns\) of ints"):
            winograd_conv3x3(x, weight, bias, padding)


def test_tensors_carrying_forward_derivatives_are_refused():
    """Its derivative would be zero: a dual tensor and torch.func.jvp raise instead."""
    x, weight, bias, _ = operands(1, 16, 16, 5, 5, (1, 1))
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="no derivatives"):
        winograd_conv3x3(x, forward_ad.make_dual(weight, torch.ones_like(weight)), bias)
    with pytest.raises(RuntimeError, match="no derivatives"):
        torch.func.jvp(lambda w: winograd_conv3x3(x, w, bias), (weight,), (torch.ones_like(weight),))


@pytest.mark.parametrize("case, error, match", [
    ("channels", ValueError, "multiples of 16"),
    ("float64", TypeError, "float32"),
    ("grad", RuntimeError, "no derivatives"),
    ("kernel", ValueError, "3, 3"),
    ("addend", RuntimeError, "addend of the output's shape"),
    ("too small", RuntimeError, "smaller than the 3 x 3 kernel"),
    ("scale alone", ValueError, "come together"),
    ("scale shape", ValueError, r"input_scale must be \(16,\), one value per input channel"),
    ("shift dtype", TypeError, "input_shift must be float32"),
    ("moments dtype", TypeError, "moments must be float64 on input's device"),
    ("moments shape", ValueError, r"moments must be of shape \(2, 16\) \(mean and variance per output channel\)"),
    ("moments grad", RuntimeError, "no derivatives"),
    ("no points", ValueError, "a weight of 0 points"),
    ("points' images", ValueError, "a weight of 2 points needs a multiple of 2 images"),
    ("points' bias", ValueError, r"bias must be \(2, 16\), one value per output channel and point"),
])
def test_bad_input_is_named(case, error, match):
    x, weight, bias, addend = operands(1, 16, 16, 5, 5, (1, 1))
    padding = (1, 1)
    if case == "channels":
        x, weight = x[:, :12], weight[:, :12]
    elif case == "float64":
        x = x.double()
    elif case == "grad":
        weight.requires_grad_(True)
    elif case == "kernel":
        weight = torch.randn(16, 16, 5, 5)
    elif case == "addend":
        addend = addend[:, :, :4]
    elif case == "too small":
        x, padding = x[:, :, :1, :1], (0, 0)
    elif case == "points' images":
        weight, bias = torch.stack([weight, weight]), torch.stack([bias, bias])
    elif case == "points' bias":
        x, addend, weight = torch.cat([x, x]), torch.cat([addend, addend]), torch.stack([weight, weight])
    maps = {"scale alone": (torch.ones(16), None), "scale shape": (torch.ones(8), torch.zeros(8)),
            "shift dtype": (torch.ones(16), torch.zeros(16, dtype=torch.float64))}
    scale, shift = maps.get(case, (None, None))
    moments = {"moments dtype": torch.empty(2, 16), "moments shape": torch.empty(16, 2, dtype=torch.float64),
               "moments grad": torch.empty(2, 16, dtype=torch.float64, requires_grad=True)}
    if case == "no points":
        weight, bias = weight[None].expand(0, 16, 16, 3, 3), bias[None].expand(0, 16)
    with pytest.raises(error, match=match):
        winograd_conv3x3(x, weight, bias, padding, addend, input_scale=scale, input_shift=shift,
                         moments=moments.get(case))


def test_the_kernel_and_the_reference_refuse_a_scale_without_a_shift():
    x, weight, bias, _ = operands(1, 16, 16, 5, 5, (1, 1))
    with pytest.raises(RuntimeError, match="come together"):
        torch.ops.mlifast.winograd_conv3x3(x, weight, bias, [1, 1], None, False, torch.ones(16), None, False)
    with pytest.raises(ValueError, match="come together"):
        winograd_conv3x3_reference(x, weight, bias, (1, 1), input_shift=torch.ones(16))


def test_the_multipoint_resnet_computes_its_convolutions_with_it(monkeypatch):
    """A float32 ResNet-20 of width 16 along a line: the 3 × 3 stride-1 convolutions it
    computes one point at a time (from PER_POINT_MIN_POSITIONS: the first stage's, on two
    32 × 32 images) run winograd_conv3x3, post-ops joined, in one call for the 3 points,
    and the outputs equal the one-point-at-a-time oracle's."""
    calls, into = [], []
    monkeypatch.setattr(pending, "_WINOGRAD_OUT", lambda *args, **kwargs: calls.append(
        (tuple(args[1].shape[:3]), args[4] is not None, args[5])) or into.append(
            kwargs["out"].shape[0] == args[0].shape[0] == 3 * 2) or WINOGRAD_OUT(*args, **kwargs))
    a, b = pair(lambda: ResNet20(width=16), torch.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # (under autograd every convolution is ATen's)
        fast = check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x, dtype=torch.float32)
    # each of stage 1's 3 blocks: conv1 → bn → ReLU joined, conv2 → bn → + x → ReLU joined;
    # the 3 points' rows in one call
    assert set(calls) == {((3, 16, 16), False, True), ((3, 16, 16), True, True)} and all(into)
    calls.clear()
    monkeypatch.setattr(pending, "WINOGRAD_DEVICES", set())
    with torch.no_grad():
        fast(x)
    assert not calls


def test_forward_mode_through_the_multipoint_resnet_keeps_its_derivatives(monkeypatch):
    """gauss_length's nested forward-mode derivatives of a float32 ResNet-20 of width 16
    (its convolutions per point on 32 × 32 images) equal float64's: Winograd, which has no
    derivatives, is never handed a tensor that carries them (before, their derivatives
    were silently zero: 4.34 for 4.60)."""
    handed = []
    monkeypatch.setattr(pending, "_WINOGRAD_OUT", lambda *args, **kwargs: handed.append(
        carries_derivatives(*args[:2])) or WINOGRAD_OUT(*args, **kwargs))
    a, b = pair(lambda: ResNet20(width=16), torch.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    length = gauss_length(a, mlifast.Line(a, b), [(x, x)], alphas=5)
    expected = gauss_length(a, mlifast.Line(a, b), [(x.double(), x.double())], alphas=5, dtype=torch.float64)
    assert abs(length - expected) < 1e-4 * expected and not any(handed)


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: a Conv2d whose `_conv_forward` convolves another weight."""

    def _conv_forward(self, x, weight, bias):
        mean, std = weight.mean((1, 2, 3), keepdim=True), weight.std((1, 2, 3), keepdim=True)
        return super()._conv_forward(x, (weight - mean) / (std + 1e-5), bias)


class StandardisedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), StandardisedConv(16, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.stem(x))).relu().mean((2, 3))


def test_a_conv2d_subclass_with_its_own_conv_forward_keeps_it(monkeypatch):
    """Not Winograd's plain convolution: the generic rule runs its own `_conv_forward` at
    each point; the rest of the model stays fused and channels-last."""
    calls = []
    monkeypatch.setattr(pending, "_WINOGRAD_OUT", lambda *args, **kwargs: calls.append(1) or WINOGRAD_OUT(*args, **kwargs))
    torch.manual_seed(0)
    a, b = StandardisedNet().eval(), StandardisedNet().eval()
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x, dtype=torch.float32)
    assert fast.images_channels_last and not calls and not fast.per_point_fallback


@pytest.mark.parametrize("conv, rows, applies", [
    (nn.Conv2d(16, 16, 3, padding=1), (2, 16, 32, 32), True),  # 128 tiles
    (nn.Conv2d(64, 128, 3, padding=1), (8, 64, 16, 16), True),
    (nn.Conv2d(16, 16, 3, padding=1), (1, 16, 32, 32), True),  # 64 tiles
    (nn.Conv2d(64, 64, 3, padding=1), (8, 64, 8, 8), False),  # 32 tiles: the weight's transform outweighs
    (nn.Conv2d(256, 256, 3, padding=1), (16, 256, 32, 32), False),  # the weight's transform outgrows the cache
    (nn.Conv2d(16, 16, 3, padding=1, stride=2), (2, 16, 64, 64), False),
    (nn.Conv2d(16, 16, 3, padding=1, groups=2), (2, 16, 32, 32), False),
    (nn.Conv2d(16, 16, 3, padding=2, dilation=2), (2, 16, 32, 32), False),
    (nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), (2, 16, 32, 32), False),
    (nn.Conv2d(16, 16, 3, padding="same"), (2, 16, 32, 32), False),
    (nn.Conv2d(12, 16, 3, padding=1), (2, 12, 32, 32), False),
    (nn.Conv2d(16, 16, 5, padding=2), (2, 16, 32, 32), False),
], ids=str)
def test_which_convolutions_it_takes(conv, rows, applies):
    x = torch.randn(*rows).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert pending._winograd_applies(conv, x, conv.weight, conv.bias, None) is applies
        if applies:  # not in another layout or dtype
            assert not pending._winograd_applies(conv, x.contiguous(), conv.weight, conv.bias, None)
            assert not pending._winograd_applies(conv.double(), x.double(), conv.weight, conv.bias, None)
