"""multipoint_combine: compiled kernel vs reference vs multipoint_linear of a shared input;
and the per-point-weight kernel's kept workspace."""
import subprocess
import sys

import pytest
import torch

import mlifast
from mlifast.ops import multipoint_combine, multipoint_combine_reference, multipoint_linear
from test_ops_linear import RTOL, make_args, per_point_loop, rel_err


def combine_args(K, R, I, O, J, bias, dtype, seed=0):
    """(base, along, b, db, c) of a shared input x, and the multipoint_linear args."""
    x, w, b, d, db, c = make_args(K, R, I, O, J, True, bias, dtype, seed)
    base, along = x @ w.t(), torch.einsum("ri,joi->rjo", x, d)
    return (base, along, b, db, c), (x, w, b, d, db, c)


def test_cpp_kernel_is_built():
    assert mlifast.info()["ops"]["multipoint_combine"]["cpu"] == "cpp", mlifast.info()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("J", [1, 3])
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("R", [1, 70])
@pytest.mark.parametrize("bias", ["none", "fixed", "moving"])
def test_matches_reference_and_loop(dtype, J, K, R, bias):
    args, linear_args = combine_args(K, R, 13, 7, J, bias, dtype)
    expected = per_point_loop(*(a.double() if a is not None else None for a in linear_args))
    kernel = multipoint_combine(*args)
    assert kernel.shape == (K, R, 7) and kernel.dtype == dtype
    assert rel_err(kernel.double(), expected) < RTOL[dtype]
    assert rel_err(multipoint_combine_reference(*args).double(), expected) < RTOL[dtype]
    assert rel_err(kernel.double(), multipoint_linear(*linear_args).double()) < RTOL[dtype]


def test_noncontiguous_and_empty():
    args, linear_args = combine_args(4, 6, 5, 3, 2, "moving", torch.float64)
    base, along, b, db, c = args
    base_t = base.t().contiguous().t()
    along_t = along.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert not base_t.is_contiguous() and not along_t.is_contiguous()
    assert rel_err(multipoint_combine(base_t, along_t, b, db, c), per_point_loop(*linear_args)) < 1e-12
    assert multipoint_combine(base[:0], along[:0], b, db, c).shape == (4, 0, 3)


def test_bfloat16_close_to_float64():
    args, linear_args = combine_args(3, 6, 16, 8, 2, "moving", torch.float64)
    expected = per_point_loop(*linear_args)
    assert rel_err(multipoint_combine(*(a.bfloat16() for a in args)).double(), expected) < 2e-2


def test_opcheck():
    args, _ = combine_args(3, 4, 6, 5, 2, "moving", torch.float32)
    args = tuple(a.requires_grad_() for a in args)
    torch.library.opcheck(torch.ops.mlifast.multipoint_combine.default, args)


@pytest.mark.parametrize("bias", ["none", "fixed", "moving"])
def test_gradcheck(bias):
    args, _ = combine_args(3, 4, 5, 3, 2, bias, torch.float64)
    args = tuple(a.requires_grad_() if a is not None else None for a in args)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.mlifast.multipoint_combine(*a), args)


def test_torch_compile_matches_eager():
    args, linear_args = combine_args(4, 5, 6, 3, 1, "moving", torch.float32)
    compiled = torch.compile(lambda *a: torch.ops.mlifast.multipoint_combine(*a) * 2, fullgraph=True)
    assert rel_err(compiled(*args).double(), 2 * per_point_loop(*(a.double() for a in linear_args))) < 1e-5


BAD_ARGS = [
    ("base", lambda a: {**a, "base": a["base"][0]}, ValueError, "base must have shape (R, O)"),
    ("along", lambda a: {**a, "along": a["along"][:, :1]}, ValueError, "along must have shape (5, 2, 3)"),
    ("coeffs rank", lambda a: {**a, "coeffs": a["coeffs"][:, 0]}, ValueError, "coeffs must have shape (K, J)"),
    ("bias", lambda a: {**a, "bias": a["bias"][:2]}, ValueError, "bias must have shape (3,)"),
    ("bias_dirs", lambda a: {**a, "bias_dirs": a["bias_dirs"].t()}, ValueError, "bias_dirs must have shape (2, 3)"),
    ("bias_dirs alone", lambda a: {**a, "bias": None}, ValueError, "bias_dirs given without bias"),
    ("dtype", lambda a: {**a, "along": a["along"].float()}, TypeError, "along must have base's dtype"),
    ("int coeffs", lambda a: {**a, "coeffs": a["coeffs"].long()}, TypeError, "coeffs must be floating point"),
    ("not a tensor", lambda a: {**a, "bias": [1.0, 2.0, 3.0]}, TypeError, "bias must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, change, error, message", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments_raise_before_the_kernel(name, change, error, message):
    (base, along, b, db, c), _ = combine_args(4, 5, 6, 3, 2, "moving", torch.float64)
    args = change(dict(base=base, along=along, bias=b, bias_dirs=db, coeffs=c))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        multipoint_combine(**args)


def test_kernel_checks_guard_direct_calls():
    (base, along, b, db, c), _ = combine_args(4, 5, 6, 3, 2, "moving", torch.float64)
    with pytest.raises(RuntimeError, match="expected along of shape"):
        torch.ops.mlifast.multipoint_combine(base, along[:, :1], b, db, c)


def test_reference_fallback_without_extension():
    code = (
        "import sys, torch; sys.modules['mlifast._C'] = None\n"
        "import warnings; warnings.simplefilter('ignore'); import mlifast\n"
        "assert mlifast.info()['ops']['multipoint_combine'] == {'cpu': 'reference', 'cuda': 'reference'}\n"
        "base, along, c = torch.randn(4, 5), torch.randn(4, 2, 5), torch.rand(3, 2)\n"
        "y = mlifast.ops.multipoint_combine(base, along, None, None, c)\n"
        "ref = torch.stack([base + c[k, 0] * along[:, 0] + c[k, 1] * along[:, 1] for k in range(3)])\n"
        "assert torch.allclose(y, ref, atol=1e-6), (y - ref).abs().max()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_per_point_weight_workspace_in_and_out_of_inference_mode():
    """The kept W_k buffer is a normal tensor whichever mode allocated it, and each call
    (another size, dtype or thread) gets the right weights."""
    x, w, b, d, db, c = make_args(3, 70, 8, 5, 2, False, "moving", torch.float32)
    expected = per_point_loop(*(a.double() for a in (x, w, b, d, db, c)))
    with torch.inference_mode():
        first = multipoint_linear(x, w, b, d, db, c)
    assert rel_err(first.double(), expected) < 1e-5
    assert rel_err(multipoint_linear(x, w, b, d, db, c).double(), expected) < 1e-5
    big = make_args(2, 64, 40, 30, 1, False, "fixed", torch.float64)
    assert rel_err(multipoint_linear(*big), per_point_loop(*big)) < 1e-12
    assert rel_err(multipoint_linear(x, w, b, d, db, c).double(), expected) < 1e-5
    w2 = w.clone().requires_grad_()
    multipoint_linear(x, w2, b, d, db, c).sum().backward()
    assert w2.grad is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_relu_joins_the_combine(dtype):
    """relu=True: max(y, 0) of multipoint_linear's outputs, NaN kept; gradients through it."""
    args, linear_args = combine_args(4, 6, 5, 3, 2, "moving", torch.float64)
    args[0][2, 1] = float("nan")
    expected = torch.relu(per_point_loop(*linear_args))
    expected[:, 2, 1] = float("nan")
    cast = tuple(a.to(dtype) for a in args)
    for got in (multipoint_combine(*cast, relu=True), multipoint_combine_reference(*cast, relu=True)):
        assert got.dtype == dtype and torch.equal(got.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert (got[finite] >= 0).all()
        assert rel_err(got[finite].double(), expected[finite]) < (2e-2 if dtype == torch.bfloat16 else RTOL[dtype])
    args, _ = combine_args(3, 4, 5, 3, 2, "moving", torch.float64)
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda *a: multipoint_combine(*a, relu=True), args)
    torch.library.opcheck(torch.ops.mlifast.multipoint_combine.default, (*args, True))
