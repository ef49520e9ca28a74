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
    if noncontiguous:  # (the per-point form read them by index as if contiguous)
        c = c.t().contiguous().t()
    return x, w, b, d, db, c


def test_cpp_kernel_is_built():
    assert mlifast.info()["ops"]["multipoint_linear"]["cpu"] == "cpp", mlifast.info()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("J", [1, 2])
@pytest.mark.parametrize("K", [1, 5])
# Rows per point: 3 take the stacked form; 8 float32 weights formed in registers (float64
# the stacked form); 130 per-point weights.
@pytest.mark.parametrize("R", [3, 8, 130])
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("R", [2, 9, 65, 130])
def test_noncontiguous_inputs(dtype, shared, R):
    args = make_args(4, R, 17, 9, 2, shared, "moving", dtype, noncontiguous=True)
    assert not args[0].is_contiguous() and not args[1].is_contiguous() and not args[5].is_contiguous()
    expected = per_point_loop(*(a.double() for a in args))
    assert rel_err(multipoint_linear(*args).double(), expected) < RTOL[dtype]


# Weights formed in registers (float32, 4 to 95 rows a point, at least 64 output features
# a thread): rows in whole tiles and tails (8 a tile at AVX-512, 6 at AVX2 and SSE), input
# features across the kernel's 1024-deep steps and not a multiple of a vector, output
# features in whole blocks of 2 vectors and partial ones, one direction and several.
FORMED = [  # K, R, I, O, J
    (1, 4, 5, 128, 1),
    (3, 8, 16, 129, 1),
    (2, 7, 33, 161, 2),
    (4, 9, 1030, 300, 1),
    (2, 17, 100, 256, 3),
    (1, 95, 20, 140, 1),
]


def runs_without_a_gemm(call) -> bool:
    """Whether `call` ran no ATen matrix product of the input (the formed path; the others
    run mm)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    return not any(e.name == "aten::mm" for e in prof.events())


@pytest.mark.parametrize("vector_bytes", [None, "32", "16"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("sizes", FORMED, ids=str)
def test_formed_weights_equal_the_float64_loop(sizes, relu, vector_bytes, monkeypatch):
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    K, R, I, O, J = sizes
    args = make_args(K, R, I, O, J, False, "moving", torch.float32, seed=I + O)
    expected = per_point_loop(*(a.double() for a in args))
    expected = expected.clamp_min(0) if relu else expected
    got = torch.ops.mlifast.multipoint_linear(*args, relu)
    assert got.shape == (K, R, O) and rel_err(got.double(), expected) < RTOL[torch.float32]
    assert runs_without_a_gemm(lambda: torch.ops.mlifast.multipoint_linear(*args, relu))


@pytest.mark.parametrize("R", [3, 8, 130])
def test_no_input_features_give_the_bias(R):
    x, w, b, d, db, c = make_args(2, R, 0, 300, 1, False, "moving", torch.float32)
    bias = (b + c @ db).double()[:, None].expand(2, R, 300)
    for relu in (False, True):
        expected = bias.clamp_min(0) if relu else bias
        assert rel_err(torch.ops.mlifast.multipoint_linear(x, w, b, d, db, c, relu).double(), expected) < 1e-6


def test_formed_weights_the_same_bits_on_one_and_two_threads():
    """Each block of output features is one thread's, summed in one order."""
    args = make_args(5, 8, 300, 300, 1, False, "moving", torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.mlifast.multipoint_linear(*args, False))
            assert runs_without_a_gemm(lambda: torch.ops.mlifast.multipoint_linear(*args, False))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


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
@pytest.mark.parametrize("R", [3, 70, 130])
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


@pytest.mark.parametrize("shared", [False, True])
def test_forward_mode_derivatives(shared):
    # (the compiled op has reverse-mode derivatives only: under a forward tangent the face takes the reference)
    x, w, b, d, db, c = make_args(3, 4, 5, 3, 2, shared, "moving", torch.float64)
    tangents = tuple(torch.randn_like(t) for t in (x, w, d, c))

    def through(op):
        return lambda x, w, d, c: op(x, w, b, d, db, c)
    _, got = torch.func.jvp(through(multipoint_linear), (x, w, d, c), tangents)
    _, want = torch.func.jvp(through(per_point_loop), (x, w, d, c), tangents)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("through", ["op", "face"])
def test_torch_compile_matches_eager(through):
    args = make_args(4, 5, 6, 3, 1, False, "moving", torch.float32)
    op = torch.ops.mlifast.multipoint_linear if through == "op" else multipoint_linear
    compiled = torch.compile(lambda *a: op(*a) * 2, fullgraph=True)
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
@pytest.mark.parametrize("R", [3, 70, 130])  # stacked; formed (float32) or per-point; per-point
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
        assert got.dtype == dtype
        if dtype == torch.bfloat16:
            # torch's bf16 GEMM on a CPU with AMX (oneDNN) spreads a NaN row to the row
            # paired with it: every NaN of the loop's is there, and maybe that one more.
            assert got.isnan()[expected.isnan()].all()
        else:
            assert torch.equal(got.isnan(), expected.isnan())
        finite = ~got.isnan()
        assert (got[finite] >= 0).all()
        assert rel_err(got[finite].double(), expected[finite]) < (2e-2 if dtype == torch.bfloat16 else RTOL[dtype])


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("R", [3, 70])
def test_gradcheck_through_relu(shared, R):
    args = make_args(3, R, 5, 4, 2, shared, "moving", torch.float64)
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda *a: multipoint_linear(*a, relu=True), args)
    torch.library.opcheck(torch.ops.mlifast.multipoint_linear.default, (*args, True))


GEMM_FORMS = {"stacked": 0, "per-point weights, 1 a GEMM": 1, "per-point weights, 2 a GEMM": 2,
              "per-point weights, all in one GEMM": 64}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("J", [1, 3])
@pytest.mark.parametrize("bias", ["none", "fixed", "moving"])
@pytest.mark.parametrize("form, shared", [(form, shared) for form in GEMM_FORMS for shared in (False, True)
                                          if not (shared and GEMM_FORMS[form])])  # (per point: its own rows)
def test_the_gpus_gemm_forms_match_the_loop(form, shared, bias, J, dtype):
    """The forms a GPU dispatches between (csrc/multipoint_linear_gemm_forms.h), built for the
    CPU too: on a machine without a GPU, the only check of their arithmetic."""
    group = GEMM_FORMS[form]
    args = make_args(5, 6, 11, 7, J, shared, bias, dtype, noncontiguous=dtype == torch.float32)
    expected = per_point_loop(*(a.double() if a is not None else None for a in args))
    y = torch.ops.mlifast._multipoint_linear_gemm_form(*args, group)
    assert y.shape == (5, 6, 7) and y.dtype == dtype
    assert rel_err(y.double(), expected) < {torch.bfloat16: 2e-2}.get(dtype, RTOL.get(dtype))


def test_the_gemm_forms_refuse_per_point_weights_of_shared_rows_and_give_empty_outputs():
    x, w, b, d, db, c = make_args(3, 4, 5, 2, 1, True, "moving", torch.float64)
    with pytest.raises(RuntimeError, match="per-point weights need an input of shape"):
        torch.ops.mlifast._multipoint_linear_gemm_form(x, w, b, d, db, c, 2)
    with pytest.raises(RuntimeError, match="must be 0 .* or positive"):
        torch.ops.mlifast._multipoint_linear_gemm_form(x, w, b, d, db, c, -1)
    x, w, b, d, db, c = make_args(3, 0, 5, 2, 1, False, "moving", torch.float64)
    assert torch.ops.mlifast._multipoint_linear_gemm_form(x, w, b, d, db, c, 0).shape == (3, 0, 2)
