"""multipoint_linear: compiled kernel vs the pure-PyTorch reference vs the per-point loop."""
import subprocess
import sys

import pytest
import torch

import mlifast
from mlifast.ops import multipoint_linear, multipoint_linear_reference

# float32 tolerance: sums of ~100 products of O(1) values with a different summation
# order than the loop (GEMM blocking) differ by a few ulps of the largest partial sum.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def per_point_loop(x, w, b, d, db, c):
    """The oracle: materialise each point's weight and run a plain linear layer."""
    outs = []
    for k in range(c.shape[0]):
        w_k = w + torch.einsum("j,joi->oi", c[k], d)
        b_k = None if b is None else (b if db is None else b + c[k] @ db)
        x_k = x if x.dim() == 2 else x[k]
        outs.append(torch.nn.functional.linear(x_k, w_k, b_k))
    return torch.stack(outs)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_args(K, R, I, O, J, shared, bias, dtype, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        if noncontiguous:  # same values, transposed storage
            t = torch.randn(*reversed(shape), generator=g, dtype=torch.float64).permute(
                *reversed(range(len(shape))))
            return t.to(dtype)
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x = rand(R, I) if shared else rand(K, R, I)
    w, d = rand(O, I), rand(J, O, I)
    b = rand(O) if bias != "none" else None
    db = rand(J, O) if bias == "moving" else None
    c = torch.linspace(-0.5, 1.5, K * J, dtype=torch.float64).reshape(K, J).to(dtype)
    return x, w, b, d, db, c


def test_cpp_kernel_is_built():
    assert mlifast.info()["ops"]["multipoint_linear"]["cpu"] == "cpp", mlifast.info()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("J", [1, 2])
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("R", [3, 70])  # 70 rows per point take the per-point-weight path
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", ["none", "fixed", "moving"])
def test_matches_reference_and_loop(dtype, J, K, R, shared, bias):
    args = make_args(K, R, 13, 7, J, shared, bias, dtype)
    expected = per_point_loop(*(a.double() if a is not None else None for a in args))
    kernel = multipoint_linear(*args)
    reference = multipoint_linear_reference(*args)
    assert kernel.shape == (K, R, 7) and kernel.dtype == dtype
    assert rel_err(kernel.double(), expected) < RTOL[dtype]
    assert rel_err(reference.double(), expected) < RTOL[dtype]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("R", [2, 65])
def test_noncontiguous_inputs(shared, R):
    args = make_args(4, R, 17, 9, 2, shared, "moving", torch.float64, noncontiguous=True)
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    expected = per_point_loop(*args)
    assert rel_err(multipoint_linear(*args), expected) < 1e-10


def test_input_slice_of_larger_batch():
    x, w, b, d, db, c = make_args(3, 50, 8, 5, 1, False, "fixed", torch.float64)
    x_view = x[:, ::2]  # strided rows
    assert rel_err(multipoint_linear(x_view, w, b, d, db, c), per_point_loop(x_view, w, b, d, db, c)) < 1e-10


def test_empty_sizes():
    x, w, b, d, db, c = make_args(3, 0, 8, 5, 1, False, "fixed", torch.float64)
    assert multipoint_linear(x, w, b, d, db, c).shape == (3, 0, 5)
    x, w, b, d, db, c = make_args(2, 4, 0, 5, 1, True, "moving", torch.float64)
    assert rel_err(multipoint_linear(x, w, b, d, db, c), per_point_loop(x, w, b, d, db, c)) < 1e-12


def test_bfloat16_close_to_float64():
    args = make_args(3, 6, 16, 8, 2, False, "moving", torch.bfloat16)
    expected = per_point_loop(*(a.double() for a in args))
    # bf16 keeps 8 bits of mantissa: one rounding of each output is 2^-8 relative.
    assert rel_err(multipoint_linear(*args).double(), expected) < 2e-2


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("R", [3, 70])
def test_opcheck(shared, R):
    args = make_args(3, R, 6, 4, 2, shared, "moving", torch.float32)
    args = tuple(a.requires_grad_() if a is not None else None for a in args)
    torch.library.opcheck(torch.ops.mlifast.multipoint_linear.default, args)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", ["none", "fixed", "moving"])
def test_gradcheck(shared, bias):
    args = make_args(3, 4, 5, 3, 2, shared, bias, torch.float64)
    args = tuple(a.requires_grad_() if a is not None else None for a in args)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.mlifast.multipoint_linear(*a), args)


def test_torch_compile_matches_eager():
    args = make_args(4, 5, 6, 3, 1, False, "moving", torch.float32)
    compiled = torch.compile(lambda *a: torch.ops.mlifast.multipoint_linear(*a) * 2, fullgraph=True)
    assert rel_err(compiled(*args).double(), 2 * per_point_loop(*(a.double() for a in args))) < 1e-5


BAD_ARGS = [
    ("weight", lambda a: {**a, "weight": a["weight"][0]}, ValueError, "weight must have shape (O, I)"),
    ("input", lambda a: {**a, "input": a["input"][:, :, :-1]}, ValueError, "input must have shape (4, R, 6)"),
    ("input K", lambda a: {**a, "input": a["input"][:2]}, ValueError, "input must have shape (4, R, 6)"),
    ("coeffs rank", lambda a: {**a, "coeffs": a["coeffs"][:, 0]}, ValueError, "coeffs must have shape (K, J)"),
    ("weight_dirs", lambda a: {**a, "weight_dirs": a["weight_dirs"][:1]}, ValueError, "weight_dirs must have shape (2, 3, 6)"),
    ("bias", lambda a: {**a, "bias": a["bias"][:2]}, ValueError, "bias must have shape (3,)"),
    ("bias_dirs", lambda a: {**a, "bias_dirs": a["bias_dirs"].t()}, ValueError, "bias_dirs must have shape (2, 3)"),
    ("bias_dirs alone", lambda a: {**a, "bias": None}, ValueError, "bias_dirs given without bias"),
    ("dtype", lambda a: {**a, "input": a["input"].float()}, TypeError, "input must have weight's dtype"),
    ("int coeffs", lambda a: {**a, "coeffs": a["coeffs"].long()}, TypeError, "coeffs must be floating point"),
    ("not a tensor", lambda a: {**a, "bias": [1.0, 2.0, 3.0]}, TypeError, "bias must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, change, error, message", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments_raise_before_the_kernel(name, change, error, message):
    x, w, b, d, db, c = make_args(4, 5, 6, 3, 2, False, "moving", torch.float64)
    args = change(dict(input=x, weight=w, bias=b, weight_dirs=d, bias_dirs=db, coeffs=c))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        multipoint_linear(**args)


def test_kernel_checks_guard_direct_calls():
    x, w, b, d, db, c = make_args(4, 5, 6, 3, 2, False, "moving", torch.float64)
    with pytest.raises(RuntimeError, match="expected weight_dirs of shape"):
        torch.ops.mlifast.multipoint_linear(x, w, b, d[:1], db, c)


def test_reference_fallback_without_extension():
    """With the compiled module unimportable, mlifast warns once and runs the reference."""
    code = (
        "import sys, warnings, torch; sys.modules['mlifast._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always'); import mlifast\n"
        "assert any('reference' in str(w.message) for w in caught), caught\n"
        "assert mlifast.info()['ops']['multipoint_linear'] == {'cpu': 'reference', 'cuda': 'reference'}\n"
        "x, w, d, c = torch.randn(3, 4, 5), torch.randn(2, 5), torch.randn(1, 2, 5), torch.rand(3, 1)\n"
        "y = mlifast.ops.multipoint_linear(x, w, None, d, None, c)\n"
        "ref = torch.stack([x[k] @ (w + c[k, 0] * d[0]).t() for k in range(3)])\n"
        "assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [3, 70])  # the stacked combine, and the per-point weights' bias pass
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", ["none", "moving"])
def test_relu_joins_the_layer(dtype, R, shared, bias):
    """relu=True: max(y, 0) of the loop's outputs, NaN kept (a NaN input row stays NaN)."""
    args = make_args(4, R, 13, 7, 2, shared, bias, dtype)
    x = args[0].clone()
    x[..., 1, 0] = float("nan")
    args = (x, *args[1:])
    expected = torch.relu(per_point_loop(*(a.double() if a is not None else None for a in args)))
    for got in (multipoint_linear(*args, relu=True), multipoint_linear_reference(*args, relu=True)):
        assert got.dtype == dtype and torch.equal(got.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert (got[finite] >= 0).all()
        assert rel_err(got[finite].double(), expected[finite]) < (2e-2 if dtype == torch.bfloat16 else RTOL[dtype])


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("R", [3, 70])
def test_gradcheck_through_relu(shared, R):
    args = make_args(3, R, 5, 4, 2, shared, "moving", torch.float64)
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda *a: multipoint_linear(*a, relu=True), args)
    torch.library.opcheck(torch.ops.mlifast.multipoint_linear.default, (*args, True))
