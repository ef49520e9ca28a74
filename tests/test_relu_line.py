"""relu_line_linear (the linear layer after a ReLU along a line) and PendingLine, which
runs an MLP's first two moving layers through it: against the loop."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlifast
import mlifast.multipoint.relu_line as relu_line
from mlifast.ops import relu_line_linear, relu_line_linear_reference
from oracle import TOL, oracle_outputs, rel_err
from test_evaluate import loop_evaluate


def line_operands(rows, inputs, outputs, dtype, seed=0, bias=True, bias_dir=True):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    b = t(outputs) if bias else None
    return t(rows, inputs), t(rows, inputs), t(outputs, inputs), t(outputs, inputs), b, (
        t(outputs) if bias and bias_dir else None)


def per_point_loop(base, along, weight, weight_dir, bias, bias_dir, coeffs, relu, slope=0.0):
    """y[k] from the weights at c_k, one point at a time, in float64; `slope`: the first
    activation's below 0 (a LeakyReLU's)."""
    out = []
    for c in coeffs.double().tolist():
        h = F.leaky_relu(base.double() + c * along.double(), slope)
        y = h @ (weight.double() + c * weight_dir.double()).t()
        if bias is not None:
            y = y + bias.double() + (0 if bias_dir is None else c * bias_dir.double())
        out.append(torch.relu(y) if relu else y)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows,inputs,outputs", [(40, 96, 80), (7, 13, 37), (3, 5, 1), (16, 64, 300)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("vector_bytes", [None, "32", "16"])
@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
def test_kernel_and_reference_equal_the_loop(dtype, rows, inputs, outputs, relu, vector_bytes, slope, monkeypatch):
    """Unsorted points with a repeat, outside [0, 1] too: about half the units switch between
    the extremes; widths with and without a partial column tile (4 vectors of 16 to 64
    bytes), in each vector width the CPU has (the widest unless told); after a ReLU or a
    LeakyReLU (of either sign)."""
    if vector_bytes:
        monkeypatch.setenv("MLIFAST_VECTOR_BYTES", vector_bytes)
    operands = line_operands(rows, inputs, outputs, dtype)
    coeffs = torch.tensor([0.5, -1.0, 2.0, 0.25, 0.5, 0.0, 1.0, -0.3], dtype=dtype)
    expected = per_point_loop(*operands, coeffs, relu, slope)
    for op in (relu_line_linear, relu_line_linear_reference):
        y = op(*operands, coeffs, relu, slope)
        assert y.shape == (8, rows, outputs) and y.dtype == dtype
        assert rel_err(y, expected) < (1e-12 if dtype == torch.float64 else 1e-5), op.__name__


@pytest.mark.parametrize("bias,bias_dir", [(False, False), (True, False)])
def test_without_bias_or_its_direction(bias, bias_dir):
    operands = line_operands(9, 20, 33, torch.float64, bias=bias, bias_dir=bias_dir)
    coeffs = torch.linspace(0, 1, 6, dtype=torch.float64)
    assert rel_err(relu_line_linear(*operands, coeffs), per_point_loop(*operands, coeffs, False)) < 1e-12


def test_no_inputs_gives_the_bias():
    """I = 0: each point's output is its bias (through the ReLU), as in the loop."""
    operands = line_operands(3, 0, 4, torch.float64)
    coeffs = torch.tensor([0.0, -2.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    for slope in (0.0, 0.1):
        y = relu_line_linear(*operands, coeffs, True, slope)
        assert rel_err(y, per_point_loop(*operands, coeffs, True, slope)) < 1e-12 and y.abs().sum() > 0


def test_one_point_and_units_that_never_switch():
    """K = 1; units with along = 0, which never switch."""
    base, along, weight, weight_dir, bias, bias_dir = line_operands(6, 10, 20, torch.float64)
    along[:, :4] = 0
    for coeffs in (torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)):
        operands = (base, along, weight, weight_dir, bias, bias_dir)
        assert rel_err(relu_line_linear(*operands, coeffs, True), per_point_loop(*operands, coeffs, True)) < 1e-12


def test_non_finite_inputs_give_what_the_loop_gives():
    """NaN stays NaN and infinities propagate as in the loop (the kernel then takes the
    per-point form: a NaN never switches cleanly)."""
    operands = list(line_operands(5, 12, 40, torch.float32))
    operands[0][1, 3] = float("nan")
    operands[1][3, 2] = float("inf")
    coeffs = torch.tensor([0.4, 1.0, -0.2, 0.0])  # (unsorted: each point's bias must follow it)
    for slope in (0.0, 0.2):
        y = relu_line_linear(*operands, coeffs, True, slope)
        expected = relu_line_linear_reference(*operands, coeffs, True, slope)
        assert torch.equal(y.isnan(), expected.isnan()) and y[:, 1].isnan().all()
        finite = expected.isfinite()
        assert torch.equal(y.isfinite(), finite) and rel_err(y[finite], expected[finite]) < 1e-5


def test_bad_arguments_are_named():
    base, along, weight, weight_dir, bias, bias_dir = line_operands(4, 6, 8, torch.float32)
    c = torch.linspace(0, 1, 3)
    with pytest.raises(ValueError, match="weight_dir must have shape"):
        relu_line_linear(base, along, weight, weight_dir[:, :5], bias, bias_dir, c)
    with pytest.raises(ValueError, match="coeffs"):
        relu_line_linear(base, along, weight, weight_dir, bias, bias_dir, c[:, None])
    with pytest.raises(ValueError, match="bias_dir given without bias"):
        relu_line_linear(base, along, weight, weight_dir, None, bias_dir, c)
    with pytest.raises(TypeError, match="float32 or float64"):
        relu_line_linear(*(t.bfloat16() for t in (base, along, weight, weight_dir, bias, bias_dir)), c)
    with pytest.raises(TypeError, match="along must have base's dtype"):
        relu_line_linear(base, along.double(), weight, weight_dir, bias, bias_dir, c)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(3, 4, 8\) tensor"):
        relu_line_linear(base, along, weight, weight_dir, bias, bias_dir, c, out=torch.empty(3, 8, 4).mT)
    out = torch.empty(3, 4, 8)
    relu_line_linear(base, along, weight, weight_dir, bias, bias_dir, c, out=out)
    assert out._version > 0  # (the write is seen: autograd, PendingInputWritten)
    with pytest.raises(RuntimeError, match="no derivatives"):
        relu_line_linear(base, along, weight, weight_dir, bias, bias_dir, c, out=torch.zeros(3, 4, 8).requires_grad_())
    memory = torch.randn(96)  # an out sharing memory with base
    with pytest.raises(RuntimeError, match="unsupported operation"):
        torch.ops.mlifast.relu_line_linear.out(memory[:24].view(4, 6), along, weight, weight_dir, bias, bias_dir, c,
                                               out=memory.view(3, 4, 8))
    with pytest.raises(RuntimeError, match="no derivatives"):
        relu_line_linear(base, along, weight.requires_grad_(), weight_dir, bias, bias_dir, c)


# ----------------------------------------------------------------------------- in a model


def mlp(hidden=24, depth=2, activation=nn.ReLU):
    layers = [nn.Flatten(), nn.Linear(12, hidden), activation()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), activation()]
    return nn.Sequential(*layers, nn.Linear(hidden, 5))


def endpoints(factory, dtype, seed=0):
    torch.manual_seed(seed)
    a = factory().to(dtype).eval()
    torch.manual_seed(seed + 1)
    return a, factory().to(dtype).eval()


@pytest.fixture
def op_calls(monkeypatch):
    """The (K,) coefficients of every relu_line_linear call the multi-point model makes."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[6])
        return relu_line_linear(*args, **kwargs)

    monkeypatch.setattr(relu_line, "relu_line_linear", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group", [None, 2])
@pytest.mark.parametrize("activation", [nn.ReLU, lambda: nn.LeakyReLU(0.1)], ids=["ReLU", "LeakyReLU"])
def test_mlp_outputs_equal_the_loop(dtype, group, activation, op_calls):
    """Whole or in groups (one sweep for all points of the call, each group its share)."""
    a, b = endpoints(lambda: mlp(depth=3, activation=activation), dtype)
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.9, 0.3, 1.5, -0.5, 0.6, 0.1, 1.0])
    fast = mlifast.interpolate(a, line, coords)
    fast.points_per_group = group
    x = torch.randn(11, 3, 4, dtype=dtype)
    with torch.no_grad():
        out = fast(x)
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], expected) < TOL[dtype]
    # (the first-call check's run is this call's): one sweep for all points
    assert [c.shape[0] for c in op_calls] == [8] and fast.shares_rows


@pytest.mark.parametrize("order", ["rows", "snake", "columns", "two lines"])
@pytest.mark.parametrize("group", [None, 4])
def test_plane_points_run_as_lines(order, group, op_calls):
    """A 9 × 9 grid of a plane, row by row, in loss-landscapes' snake order, or column by
    column: nine runs of 9 points along one direction. `make demo`'s two lines from θ0,
    (α, 0) then (0, α): two runs."""
    a, b = endpoints(mlp, torch.float64)
    _, c = endpoints(mlp, torch.float64, seed=5)
    plane = mlifast.Plane.through(a, b, c)
    ticks = torch.linspace(-0.2, 1.2, 9).tolist()
    if order == "two lines":
        points = [(t, 0.0) for t in ticks] + [(0.0, t) for t in ticks]
    else:
        grid = [[(u, v) for v in ticks] for u in ticks]
        if order == "snake":
            grid = [line[::-1] if i % 2 else line for i, line in enumerate(grid)]
        points = [p for line in (grid if order != "columns" else zip(*grid)) for p in line]
    coords = torch.tensor(points)
    fast = mlifast.interpolate(a, plane, coords)
    fast.points_per_group = group
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        out = fast(x)
    for k, expected in enumerate(oracle_outputs(a, plane, coords, x)):
        assert rel_err(out[k], expected) < 1e-12
    assert [len(c) for c in op_calls] == [9] * (2 if order == "two lines" else 9)


def test_a_runs_outputs_are_dropped_once_every_group_had_its_part(op_calls):
    """A 9 × 9 grid in groups of 4, the first call's check running the groups of points 0
    and 80 first: at most those two runs and the current one are held at any time."""
    from mlifast.multipoint.relu_line import Lines

    a, b = endpoints(mlp, torch.float64)
    _, c = endpoints(mlp, torch.float64, seed=5)
    ticks = torch.linspace(-0.2, 1.2, 9).tolist()
    coords = torch.tensor([(u, v) for u in ticks for v in ticks])
    fast = mlifast.interpolate(a, mlifast.Plane.through(a, b, c), coords)
    fast.points_per_group = 4
    held = []

    def consume(start, _out):
        lines = [kept[1] for kept in fast.context._kept.values() if isinstance(kept[1], Lines)]
        held.append(sum(len(line.outputs) for line in lines))

    with torch.no_grad(), fast.outputs_to(consume):
        fast(torch.randn(5, 12, dtype=torch.float64))
    assert len(held) == 21 and max(held) <= 3 and held[-1] == 0
    assert [len(c) for c in op_calls] == [9] * 9


@pytest.mark.parametrize("limit", ["MIN_POINTS_PER_LINE", "LINE_BYTES"])
@pytest.mark.parametrize("activation", [nn.ReLU, lambda: nn.LeakyReLU(0.1)], ids=["ReLU", "LeakyReLU"])
def test_the_two_rules_run_for_short_or_large_lines(limit, activation, monkeypatch, op_calls):
    monkeypatch.setattr(relu_line, limit, 100 if limit == "MIN_POINTS_PER_LINE" else 0)
    a, b = endpoints(lambda: mlp(activation=activation), torch.float64)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 9)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(7, 12, dtype=torch.float64)
    with torch.no_grad():
        out = fast(x)
    assert not op_calls
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], expected) < 1e-12


def test_evaluate_losses_equal_the_loop(op_calls):
    a, b = endpoints(mlp, torch.float64)
    line = mlifast.Line(a, b)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(9, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (9,), generator=g))
            for _ in range(3)]
    res = mlifast.evaluate(a, line, data, coords=9, metrics=("accuracy",), progress=False)
    losses, accs = loop_evaluate(a, line, data, res.alphas.tolist(), "interpolate")
    assert rel_err(res["loss"], torch.tensor(losses)) < 1e-12
    assert torch.allclose(res["accuracy"].double(), torch.tensor(accs, dtype=torch.float64))
    assert op_calls


@pytest.mark.parametrize("case", ["plane", "gradients", "first layer frozen"])
def test_the_two_rules_run_where_it_does_not_apply(case, op_calls):
    """Points of a plane off any common line, autograd: the loop's outputs, op unused. With
    the first layer frozen its output is the same at every point: the next two layers join."""
    a, b = endpoints(lambda: mlp(depth=3), torch.float64)
    if case == "first layer frozen":
        b[1].load_state_dict(a[1].state_dict())
    if case == "plane":
        _, c = endpoints(lambda: mlp(depth=3), torch.float64, seed=5)
        space, coords = mlifast.Plane.through(a, b, c), torch.rand(8, 2, generator=torch.Generator().manual_seed(0))
    else:
        space, coords = mlifast.Line(a, b), torch.linspace(0, 1, 8)
    fast = mlifast.interpolate(a, space, coords)
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.set_grad_enabled(case == "gradients"):
        out = fast(x.requires_grad_(case == "gradients"))
    for k, expected in enumerate(oracle_outputs(a, space, coords, x)):
        assert rel_err(out[k], expected) < 1e-12
    if case == "gradients":
        out.sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        sum(o.sum() for o in oracle_outputs(a, space, coords, x_ref)).backward()
        assert rel_err(x.grad, x_ref.grad) < 1e-12
    assert len(op_calls) == (case == "first layer frozen")


def test_output_memory_is_reused_only_where_nothing_else_holds_it():
    """An MLP ending at the second layer returns (views of) the op's output: the caller's
    results of one call survive the next. Behind a further layer, the memory is reused."""
    shallow = lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))  # noqa: E731
    a, b = endpoints(shallow, torch.float64)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 8)
    fast = mlifast.interpolate(a, line, coords)
    x1, x2 = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, 12, dtype=torch.float64)
    with torch.no_grad():
        out1 = fast(x1)
        kept = out1.clone()
        out2 = fast(x2)
    assert torch.equal(out1, kept)
    for k, (e1, e2) in enumerate(zip(oracle_outputs(a, line, coords, x1), oracle_outputs(a, line, coords, x2))):
        assert rel_err(out1[k], e1) < 1e-12 and rel_err(out2[k], e2) < 1e-12

    a, b = endpoints(mlp, torch.float64)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), coords)
    with torch.no_grad():
        fast(x1)
        memory = [t.data_ptr() for t in fast.model[3].line_outputs]
        fast(x2)
    assert [t.data_ptr() for t in fast.model[3].line_outputs] == memory and len(memory) == 1


def test_output_memory_made_in_inference_mode_is_not_written_outside_it():
    """(A Tanh after the second layer works in place on its output: an inference tensor
    reused outside inference mode would raise there.)"""
    a, b = endpoints(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                                           nn.Linear(16, 5)), torch.float32)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 8)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(6, 12)
    with torch.inference_mode():
        first = fast(x)
    with torch.no_grad():
        second = fast(x)
    assert torch.equal(first, second)


class OwnForward(nn.Module):
    """An MLP written with its own forward, functional ReLUs of every kind and dropout."""

    def __init__(self, relu: str):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 5)
        self.drop, self.relu = nn.Dropout(0.3), relu

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        if self.relu == "F.relu":
            h = F.relu(h)
        elif self.relu == "method":
            h = h.relu()
        elif self.relu == "in place":
            h.relu_()
        elif self.relu == "module in place":
            h = nn.ReLU(inplace=True)(h)
        elif self.relu == "leaky":
            h = F.leaky_relu(h, 0.1)
        elif self.relu == "leaky module in place":
            h = nn.LeakyReLU(0.2, inplace=True)(h)
        elif self.relu == "leaky, negative slope":
            h = F.leaky_relu(h, negative_slope=-0.3)
        elif self.relu == "leaky twice":
            h = F.leaky_relu(F.leaky_relu(h, 0.1), 0.2)
        h = self.fc2(self.drop(h))
        return self.fc3(torch.tanh(h))


@pytest.mark.parametrize("relu", ["F.relu", "method", "in place", "module in place", "none", "leaky",
                                  "leaky module in place", "leaky, negative slope", "leaky twice"])
def test_models_with_their_own_forward(relu, op_calls):
    """Not an nn.Sequential: the first layer's output waits as a PendingLine; a ReLU or a
    LeakyReLU of any kind and dropout in eval mode keep it pending, the second layer
    computes from it. Without one, or after two LeakyReLUs, the second layer reads it as it
    is."""
    a, b = endpoints(lambda: OwnForward(relu), torch.float64)
    line, coords = mlifast.Line(a, b), torch.linspace(-0.5, 1.5, 9)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        out = fast(x)
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], expected) < 1e-12
    assert len(op_calls) == (relu not in ("none", "leaky twice"))
    assert fast.shares_rows  # (the first-call check agreed with the shared rows' outputs)


def test_an_output_read_twice_and_written_in_place(op_calls):
    """h = relu(fc1(x)) feeds fc2, is summed, then written in place and fed to fc2 again:
    every reader sees what the loop does."""
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 5)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            y = self.fc2(h)
            total = h.sum(1, keepdim=True)
            h.mul_(2)
            return y + total + self.fc2(h)

    a, b = endpoints(Branches, torch.float64)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 9)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(6, 12, dtype=torch.float64)
    with torch.no_grad():
        out = fast(x)
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], expected) < 1e-12
    assert len(op_calls) == 1  # (the second fc2 reads h as written)


class Twice(nn.Module):
    """The same two layers on two inputs, and a layer applied twice to the same output,
    one result written in place before and one after the second read."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        y1, y2 = self.fc2(h), self.fc2(h)
        y1.mul_(2)
        y3 = self.fc2(h)
        return y1 + y2 + y3 - self.fc2(F.relu(self.fc1(2 * x)))


def test_groups_keep_each_input_and_each_reader_apart(op_calls):
    """In groups, the runs kept for the call belong to one rule and one input (not the
    other input's), and a second reader of the same part gets its own copy (not the first
    reader's, written in place). Groups set after the first call: its check would otherwise
    catch a disagreement and stop sharing rows."""
    a, b = endpoints(Twice, torch.float64)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 12)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(6, 12, dtype=torch.float64)
    expected = oracle_outputs(a, line, coords, x)
    with torch.no_grad():
        fast(x)
        fast.points_per_group = 5
        out = fast(x)
    assert fast.shares_rows and not fast.per_point_fallback
    for k in range(len(coords)):
        assert rel_err(out[k], expected[k]) < 1e-12
    assert len(op_calls) > 3  # (the whole call's 3, then the grouped call's)


@pytest.mark.parametrize("limit,kept", [(None, 2), (0, 1)])
def test_kept_output_memory_is_bounded(limit, kept, monkeypatch):
    """Two runs of a plane's grid, held at once by the two groups between them: both kept
    for the next call, unless that is over KEPT_OUTPUT_BYTES (then only the newest)."""
    if limit is not None:
        monkeypatch.setattr(relu_line, "KEPT_OUTPUT_BYTES", limit)
    a, b = endpoints(mlp, torch.float64)
    _, c = endpoints(mlp, torch.float64, seed=5)
    plane = mlifast.Plane.through(a, b, c)
    coords = torch.tensor([(u, v) for u in (0.0, 1.0) for v in torch.linspace(0, 1, 9).tolist()])
    fast = mlifast.interpolate(a, plane, coords)
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        fast(x)
        fast.points_per_group = 6
        fast(x)
    assert len(fast.model[3].line_outputs) == kept
