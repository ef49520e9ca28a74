"""The first call of every (K, input shapes) is checked against the model itself at the
first and last point; that check also decides whether rows are shared; the points-per-pass
probe runs the model once, unchecked; each check builds one full state per checked point,
in one reused buffer."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlifast
from mlifast.engine import chunking
from mlifast.multipoint import MultiPointModel
from mlifast.multipoint.reference import PerPointModel
from mlifast.spaces import Span
from models import CapturesBatch
from oracle import oracle_outputs, rel_err


def line_of(factory, seed=0):
    torch.manual_seed(seed)
    a, b = factory().double().eval(), factory().double().eval()
    return a, mlifast.Line(a, b)


def call(fast, *args):
    """(output, the fallback warnings raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(*args)
    return out, [w for w in caught if "one point at a time" in str(w.message)]


def assert_oracle(out, model, space, coords, *args, tol=1e-9):
    for k, e in enumerate(oracle_outputs(model, space, coords, *args)):
        assert rel_err(out[k], e) < tol, k


@pytest.fixture
def reference_points(monkeypatch):
    """Counts the reference's runs of the model at one point (PerPointModel.at)."""
    calls = []
    original = PerPointModel.at
    monkeypatch.setattr(PerPointModel, "at", lambda self, coord, *a, **k: calls.append(coord.tolist())
                        or original(self, coord, *a, **k))
    return calls


@pytest.fixture
def state_builds(monkeypatch):
    """Counts Span.state_at calls (each a full state of the model)."""
    calls = []
    original = Span.state_at
    monkeypatch.setattr(Span, "state_at", lambda self, *a, **k: calls.append(a[0]) or original(self, *a, **k))
    return calls


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


class PlainTensorsOnly(nn.Module):
    """Raises on anything but a plain tensor input (shared rows are a subclass)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if type(x) is not torch.Tensor:
            raise TypeError("plain tensors only")
        return self.fc(x)


class Disagrees(nn.Module):
    """Disagrees whatever the rows: reads the batch size of an activation as a number."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        return self.out(torch.tanh(h)) * h.shape[0]


class GivenStates(nn.Module):
    """An LSTM given its initial states (layers, B, H): with as many layers as examples,
    they look like batch inputs, and repeated for every point the LSTM refuses them."""

    def __init__(self, layers=2):
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 5, layers, batch_first=True), nn.Linear(5, 2)

    def forward(self, x, h0, c0):
        return self.head(self.lstm(x, (h0, c0))[0])


def test_a_multi_point_run_that_raises_where_the_model_runs_falls_back():
    a, line = line_of(GivenStates)
    coords = torch.linspace(0, 1, 3)
    x, h0, c0 = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 4, 3), (2, 2, 5), (2, 2, 5)))
    out, fallback = call(mlifast.interpolate(a, line, coords), x, h0, c0)
    assert len(fallback) == 1 and "it raised RuntimeError" in str(fallback[0].message)
    assert_oracle(out, a, line, coords, x, h0, c0)


def test_numbers_and_lists_in_the_arguments_do_not_make_new_checks(reference_points):
    class Lengths(nn.Module):  # (per-batch values: sequence lengths, a step)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, lengths, step):
            return self.fc(x) * step + len(lengths)

    a, line = line_of(Lengths)
    fast = mlifast.interpolate(a, line, 3)
    x = torch.randn(4, 4, dtype=torch.float64)
    for batch in range(3):
        call(fast, x, [batch] * 4, 0.5 + batch)
    assert len(reference_points) == 2  # (the first call's check, at its two points)


def test_running_out_of_memory_is_raised_not_taken_for_a_disagreement():
    class Large(nn.Module):  # (as a GPU would fail on K·B rows)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            if y.shape[0] > 8:
                raise MemoryError("out of memory on 24 rows")
            return y

    a, line = line_of(Large)
    fast = mlifast.interpolate(a, line, 6)
    with pytest.raises(MemoryError):
        fast(torch.randn(4, 3, dtype=torch.float64))
    assert not fast.per_point_fallback


def test_an_output_with_two_dims_that_could_hold_the_batch_is_checked_dropout_or_not():
    class BatchLast(nn.Module):  # (2, 12, B): with K·B = 12 the middle dim fits too
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(3, 24), nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.fc(x)).reshape(-1, 2, 12).permute(1, 2, 0)

    a, line = line_of(BatchLast)
    x = torch.randn(4, 3, dtype=torch.float64)
    out, _ = call(mlifast.interpolate(a, line, 3), x)  # eval mode: checked, the batch found at its last dim
    assert out.shape == (3, 2, 12, 4)
    assert_oracle(out, a, line, torch.linspace(0, 1, 3), x)
    fast = mlifast.interpolate(a.train(), line, 3)
    out, fallback = call(fast, x)  # active dropout: checked with it off, then run with it
    assert out.shape == (3, 2, 12, 4) and len(fallback) == 1


class PositionsOfAGPT(nn.Module):  # nanoGPT: (T,) position ids, T = 6 a multiple of K·B here
    def __init__(self, p=0.0):
        super().__init__()
        self.tok, self.pos = nn.Embedding(11, 8), nn.Embedding(16, 8)
        self.drop, self.attn = nn.Dropout(p), nn.MultiheadAttention(8, 2, dropout=p, batch_first=True)
        self.head = nn.Linear(8, 11)

    def forward(self, idx):
        h = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


def test_with_dropout_active_the_check_runs_with_it_off():
    # (no check ran with dropout active: the position ids were read as rows, silently)
    torch.manual_seed(0)
    a, b = PositionsOfAGPT(p=1e-12).double(), PositionsOfAGPT(p=1e-12).double()  # (train mode: active)
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    idx = torch.randint(0, 11, (2, 6))
    fast = mlifast.interpolate(a, line, coords)
    out, fallback = call(fast, idx)
    assert fallback == [] and a.drop.training and fast.model.drop.training  # (dropout on again)
    assert_oracle(out, a, line, coords, idx, tol=1e-9)


def test_a_first_call_under_a_transform_decides_nothing_for_plain_calls():
    # (under forward mode rows are repeated whatever the check's reading: it agrees on shared
    # rows it never ran, and a plain call trusting that gave this model's points each other's rows)
    a, line = line_of(CapturesBatch)
    coords, x = torch.linspace(0, 1, 3), torch.randn(5, 4, dtype=torch.float64)
    fast = mlifast.interpolate(a, line, coords)
    _, tangent = torch.func.jvp(fast, (x,), (torch.ones_like(x),))
    assert fast.shares_rows is None
    out, fallback = call(fast, x)
    assert fallback == [] and fast.shares_rows is False
    assert_oracle(out, a, line, coords, x)


class Doubles(nn.Module):
    """Writes into its input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2)
        return self.fc(x)


# ----------------------------------------------------------------------------- sharing rows


def test_shared_rows_agreeing_are_kept_and_checked_once(reference_points):
    a, line = line_of(mlp)
    coords = torch.linspace(0, 1, 5)
    fast = mlifast.interpolate(a, line, coords)
    runs = []
    run = fast._run
    fast._run = lambda *args, **kw: runs.append(args[2] if len(args) > 2 else kw["share_rows"]) or run(*args, **kw)
    x = torch.randn(3, 4, dtype=torch.float64)
    out, fallback = call(fast, x)
    assert not fallback and fast.shares_rows is True
    assert runs == [True]  # one pass, on shared rows: its outputs are the call's
    assert len(reference_points) == 2  # the model itself at points 0 and 4
    out, _ = call(fast, x)  # checked: no reference any more
    assert runs == [True, True] and len(reference_points) == 2
    assert_oracle(out, a, line, coords, x)


def test_batch_size_dependent_model_repeats_its_inputs_without_falling_back(reference_points):
    a, line = line_of(CapturesBatch)
    coords = torch.linspace(0, 1, 4)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(5, 4, dtype=torch.float64)
    out, fallback = call(fast, x)
    assert fallback == [] and not fast.per_point_fallback
    assert fast.shares_rows is False
    assert len(reference_points) == 2  # the reference outputs serve both runs
    call(fast, torch.randn(2, 4, dtype=torch.float64))  # a new shape: repeated straight away
    assert fast.shares_rows is False and len(reference_points) == 4
    assert_oracle(out, a, line, coords, x)


def test_model_raising_on_shared_rows_repeats_its_inputs():
    a, line = line_of(PlainTensorsOnly)
    coords = torch.linspace(0, 1, 3)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(4, 4, dtype=torch.float64)
    out, fallback = call(fast, x)
    assert fallback == [] and fast.shares_rows is False and not fast.per_point_fallback
    assert_oracle(out, a, line, coords, x)


def test_one_point_decides_nothing_about_sharing():
    a, line = line_of(CapturesBatch)
    one = torch.tensor([0.5])
    fast = mlifast.interpolate(a, line, one)
    x = torch.randn(5, 4, dtype=torch.float64)
    out, fallback = call(fast, x)  # one point: the same rows shared or repeated
    assert fallback == [] and fast.shares_rows is None
    assert_oracle(out, a, line, one, x)
    coords = torch.linspace(0, 1, 3)
    fast.set_coords(line.coords_tensor(coords))
    out, fallback = call(fast, x)  # three: shared rows mix them; found and repeated
    assert fallback == [] and fast.shares_rows is False
    assert_oracle(out, a, line, coords, x)


def test_model_that_truly_disagrees_still_falls_back(reference_points):
    a, line = line_of(Disagrees)
    coords = torch.linspace(0, 1, 3)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(4, 4, dtype=torch.float64)
    out, fallback = call(fast, x)
    assert len(fallback) == 1 and fast.per_point_fallback
    assert "at point #0" in str(fallback[0].message)
    # the check's at point 0 (where both its runs, shared and repeated, disagree), then the 3 points
    assert len(reference_points) == 1 + 3
    assert_oracle(out, a, line, coords, x)


def test_batch_dim_other_than_zero_never_shares():
    a, line = line_of(mlp)
    coords = torch.linspace(0, 1, 3)
    fast = mlifast.interpolate(a, line, coords, batch_dim=1)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    out, fallback = call(fast, x)
    assert fallback == [] and fast.shares_rows is False
    assert_oracle(out, a, line, coords, x)


# ----------------------------------------------------------------------------- evaluate


def mean_loss(model, line, coords, data):
    """The mean cross entropy over data of the model itself at each point."""
    return torch.tensor([sum(F.cross_entropy(oracle_outputs(model, line, torch.tensor([c], dtype=torch.float64), x)[0], y,
                                             reduction="sum").item() for x, y in data)
                         / sum(len(y) for _, y in data) for c in coords], dtype=torch.float64)


def data_for(model_in=4, classes=3, batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, model_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (6,), generator=g))
            for _ in range(batches)]


def test_evaluate_runs_two_reference_points_per_call(reference_points):
    a, line = line_of(mlp)
    data = data_for()
    for _ in range(2):  # every evaluate call is a new multi-point model: checked again
        before = len(reference_points)
        res = mlifast.evaluate(a, line, data, coords=5, progress=False)
        assert len(reference_points) - before == 2
        reference_points.clear()
        torch.testing.assert_close(res["loss"], mean_loss(a, line, res.alphas.tolist(), data), rtol=1e-9, atol=0)


def test_evaluate_with_one_point_runs_one_reference_point(reference_points):
    a, line = line_of(mlp)
    mlifast.evaluate(a, line, data_for(), coords=[0.25], progress=False)
    assert len(reference_points) == 1


def test_probe_runs_once_unchecked(reference_points):
    a, line = line_of(mlp)
    fast = MultiPointModel(a, line, line.coords_tensor(5))
    runs = []
    run = fast._run
    fast._run = lambda *args, **kw: runs.append(fast.context.num_active) or run(*args, **kw)
    data = data_for()
    per_point = chunking.bytes_per_point(fast, data[0], lambda m, b: (m(b[0]), b[1]), torch.device("cpu"))
    assert per_point.activations > 0 and per_point.kept > 0
    assert runs == [1]  # one pass of one point
    assert reference_points == [] and fast._checked == set() and fast.shares_rows is None
    assert fast.num_points == 5  # the coordinates are restored
    out, fallback = call(fast, data[0][0])  # the first real call is still checked
    assert fallback == [] and len(reference_points) == 2 and len(fast._checked) == 1
    assert runs == [1, 5]
    assert_oracle(out, a, line, fast.coords[:, 0], data[0][0])


def test_probe_counts_the_bytes_of_every_module_output():
    a, line = line_of(mlp)
    fast = MultiPointModel(a, line, line.coords_tensor(3))
    x = torch.randn(6, 4, dtype=torch.float64)
    per_point = chunking.bytes_per_point(fast, (x, None), lambda m, b: (m(b[0]), None), torch.device("cpu"))
    # Linear (6×6), Tanh (6×6), Linear (6×3), the Sequential's output (6×3), in float64
    assert per_point.activations == 8 * 6 * (6 + 6 + 3 + 3)
    assert per_point.kept == 2 * 8 * 6 * 3  # the output, and the loss's temporaries


def test_evaluate_leaves_the_data_alone_when_the_model_writes_into_it():
    a, line = line_of(Doubles)
    data = data_for()
    before = [(x.clone(), y.clone()) for x, y in data]
    for coords in ([0.5], 4):
        res = mlifast.evaluate(a, line, data, coords=coords, metrics=(), progress=False)
        for (x, y), (x0, y0) in zip(data, before):
            assert torch.equal(x, x0) and torch.equal(y, y0)
        torch.testing.assert_close(res["loss"], mean_loss(a, line, res.alphas.tolist(), data), rtol=1e-9, atol=0)


def test_one_point_model_writing_into_its_input_leaves_the_callers_tensor_alone():
    a, line = line_of(Doubles)
    one = torch.tensor([0.3])
    fast = mlifast.interpolate(a, line, one)
    fast.shares_rows = False  # repeated inputs: a single point's would be a view of the caller's
    x = torch.randn(3, 4, dtype=torch.float64)
    before = x.clone()
    for _ in range(2):  # checked, then not
        out = fast(x)
        assert torch.equal(x, before)
        assert_oracle(out, a, line, one, before.clone())


# ----------------------------------------------------------------------------- reference states


def test_reference_reuses_one_state_and_keeps_outputs_that_alias_it():
    class ReturnsItsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return self.w.expand(x.shape[0], 3)  # a view of the state

    torch.manual_seed(0)
    a, b = ReturnsItsWeight().double(), ReturnsItsWeight().double()
    line = mlifast.Line(a, b)
    coords = line.coords_tensor([0.0, 0.5, 1.0])
    x = torch.randn(2, 4, dtype=torch.float64)
    out = PerPointModel(a, line)(coords, (x,), {})
    for k, c in enumerate(coords[:, 0].tolist()):
        expected = line.state_at(c)["w"].expand(2, 3)
        assert torch.equal(out[k], expected), k


def test_reference_outside_reuse_builds_a_fresh_state_each_time(state_builds):
    a, line = line_of(mlp)
    ref = PerPointModel(a, line)
    x = torch.randn(2, 4, dtype=torch.float64)
    ref.at(torch.tensor([0.5], dtype=torch.float64), (x,), {})
    assert ref._state is None  # nothing held between calls
    with ref.reusing_state():
        ref.at(torch.tensor([0.0], dtype=torch.float64), (x,), {})
        held = ref._state
        ref.at(torch.tensor([1.0], dtype=torch.float64), (x,), {})
        assert all(ref._state[k] is held[k] for k in held)  # the same memory, rewritten
    assert ref._state is None and len(state_builds) == 3


def test_state_at_into_an_earlier_state_equals_a_fresh_one():
    torch.manual_seed(0)
    origin = {"w": torch.randn(4, 5), "cl": torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last),
              "n": torch.tensor(7), "h": torch.randn(6).half()}
    span = Span(origin, [{k: torch.randn_like(v) for k, v in origin.items() if v.is_floating_point()}
                         for _ in range(2)])
    for coord in ([0.0, 0.0], [0.3, -1.25], [1.0, 2.0]):
        fresh = span.state_at(coord)
        for k, o in origin.items():  # θ(c) as state_at documents it: directions added one at a time
            expected = o.clone()
            if o.is_floating_point():
                for j, c in enumerate(coord):
                    expected.add_(span.direction(k)[j], alpha=c)
            assert torch.equal(fresh[k], expected) and fresh[k].stride() == o.stride(), k
        buffer = span.state_at([5.0, 5.0])
        reused = span.state_at(coord, out=buffer)
        assert all(reused[k] is buffer[k] for k in buffer)
        assert all(torch.equal(reused[k], fresh[k]) for k in fresh)
    mismatched = {"w": torch.zeros(5, 4), "h": torch.zeros(6)}  # wrong shape, wrong dtype: allocated anew
    state = span.state_at([0.3, -1.25], out=mismatched)
    assert state["w"] is not mismatched["w"] and state["h"] is not mismatched["h"]
    assert torch.equal(state["w"], span.state_at([0.3, -1.25])["w"]) and state["h"].dtype == torch.float16
    assert mismatched["w"].abs().sum() == 0
    before = {k: v.clone() for k, v in span.origin.items()}
    state = span.state_at([0.3, -1.25], out=span.origin)  # never written into the span's own tensors
    assert all(torch.equal(span.origin[k], before[k]) for k in before)
    assert all(torch.equal(state[k], fresh_k) for k, fresh_k in span.state_at([0.3, -1.25]).items())


# ----------------------------------------------------------------------------- describe


def test_describe_computes_the_norms_once_per_span(monkeypatch):
    a, line = line_of(mlp)
    norms = []
    original = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *args, **kw: norms.append(1) or original(*args, **kw))
    first = line.describe()
    counted = len(norms)
    assert counted > 0
    assert line.describe() == first and len(norms) == counted
    mlifast.evaluate(a, line, data_for(), coords=3, progress=False)
    assert len(norms) == counted  # evaluate's metadata reuses them
    as32 = line.to(dtype=torch.float32)  # other values: computed anew
    assert as32.describe()["direction_norms"] == pytest.approx(first["direction_norms"], rel=1e-6)
    assert len(norms) > counted


# ----------------------------------------------------------------------------- groups


def test_groups_are_at_least_the_weights_over_one_points_activations(monkeypatch):
    torch.manual_seed(0)
    a, b = nn.Linear(64, 64).double(), nn.Linear(64, 64).double()
    line = mlifast.Line(a, b)
    fast = MultiPointModel(a, line, line.coords_tensor(1))
    data = [(torch.randn(2, 64, dtype=torch.float64), None)]
    forward = lambda m, batch: (m(batch[0]), None)  # noqa: E731
    point = chunking.bytes_per_point(fast, data[0], forward, torch.device("cpu"))
    per_point = point.activations
    assert per_point == point.live == 2 * 64 * 8  # the layer's output only
    weights = chunking.weight_bytes(line)
    assert weights == (64 * 64 + 64) * 8 * 2  # origin and one direction
    monkeypatch.setattr(chunking, "CPU_GROUP_BYTES", 1)
    _, group = chunking.plan(fast, data, forward, torch.device("cpu"))
    assert group == -(-weights // per_point)  # each group reads the weights again: no fewer points
    monkeypatch.setattr(chunking, "CPU_GROUP_BYTES", 10 * weights)
    _, group = chunking.plan(fast, data, forward, torch.device("cpu"))
    assert group == 10 * weights // point.live


class CapturesBatchWhenAsked(nn.Module):
    """A flag chooses a path whose Python depends on the batch size."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, grouped=False):
        h = self.fc1(x)
        if grouped:
            h = h.reshape(-1, x.shape[0], 6).flip(0).reshape(-1, 6)
        return self.fc2(torch.tanh(h))


def test_a_call_with_other_plain_arguments_is_checked_again():
    a, line = line_of(CapturesBatchWhenAsked)
    coords, x = torch.tensor([0.0, 0.5, 1.0]), torch.randn(4, 4, dtype=torch.float64)
    fast = mlifast.interpolate(a, line, coords)
    out, fell_back = call(fast, x)  # checked on this path: it agrees, the rows shared
    assert not fell_back and fast.shares_rows
    assert_oracle(out, a, line, coords, x)
    out, _ = call(fast, x, True)  # the same tensors, another path: on shared rows the points would trade rows
    assert_oracle(out, a, line, coords, x, True)


class BatchNormCapturesBatch(nn.Module):
    """Batch norm after Python that depends on the batch size (on shared rows the points
    trade rows, and with them their batch statistics)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        n = x.shape[0]  # on shared rows B, not K·B: the flip then reverses the order of the points
        h = self.fc1(x).reshape(-1, n, 6).flip(0).reshape(-1, 6)
        return self.fc2(self.bn(torch.tanh(h)))


def loop_with_batch_norm(model, line, coords, data, bn):
    """Per point: the model at that point, update_bn for "recompute", train-mode batch
    norm for "batch"; the mean cross entropy over data."""
    from oracle import load_point

    losses = []
    for c in coords:
        m = load_point(model, line, c)
        if bn == "recompute":
            torch.optim.swa_utils.update_bn(data, m)
        m.train(bn == "batch")
        with torch.no_grad():
            losses.append(sum(F.cross_entropy(m(x), y, reduction="sum").item() for x, y in data)
                          / sum(len(y) for _, y in data))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("bn", ["recompute", "batch"])
@pytest.mark.parametrize("factory", [
    lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)), BatchNormCapturesBatch])
def test_batch_statistics_policies_are_checked_by_the_pass_itself(monkeypatch, factory, bn):
    """Under per-point batch statistics the model's batch norms run in train mode for the
    check, so the checked pass is the call's own: one pass over each batch for "batch",
    one for gathering and one for evaluating for "recompute" (plus the probe); when shared
    rows disagree and the points run again, what the abandoned run gathered is undone."""
    runs = []
    original = MultiPointModel._groups
    monkeypatch.setattr(MultiPointModel, "_groups",
                        lambda self, *a, **k: runs.append(a[2] if len(a) > 2 else k["share_rows"]) or original(self, *a, **k))
    torch.manual_seed(0)
    a, b = factory().double().eval(), factory().double().eval()
    line, data = mlifast.Line(a, b), data_for(batches=1)
    res = mlifast.evaluate(a, line, data, coords=4, bn=bn, progress=False)
    torch.testing.assert_close(res["loss"], loop_with_batch_norm(a, line, res.alphas.tolist(), data, bn),
                               rtol=1e-9, atol=0)
    passes = 1 + (2 if bn == "recompute" else 1)  # the probe, then each pass over the batch
    assert len(runs) == passes + (factory is BatchNormCapturesBatch)  # (again on repeated inputs)


def conv_bn():
    from models import randomize_bn
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                      nn.Flatten(), nn.Linear(4 * 30 * 30, 2)), int(torch.randint(0, 1000, ())))


def test_per_point_values_are_kept_between_calls_and_renewed_with_the_coordinates():
    """Per-point parameter values (the second convolution's weight and bias, from 2,048
    positions a point; batch norm's) are formed once for all points and kept while the
    coordinates stay the same; coordinates written in place, or new ones, form them again."""
    a, line = line_of(conv_bn)
    x = torch.randn(2, 3, 34, 34, dtype=torch.float64)
    fast = MultiPointModel(a, line, torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64))
    fast(x)
    kept = {key: value for key, (_, value) in fast.context._every_point.items()}
    assert len(kept) == 6  # conv weight and bias, batch norm's weight, bias and statistics
    assert_oracle(fast(x), a, line, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), x)
    assert all(fast.context._every_point[key][1] is value for key, value in kept.items())
    fast.context.coeffs.copy_(torch.tensor([[0.25], [0.75], [1.5]], dtype=torch.float64))
    fast.coords = fast.context.coeffs.clone()
    assert_oracle(fast(x), a, line, torch.tensor([0.25, 0.75, 1.5], dtype=torch.float64), x)
    fast.set_coords(torch.tensor([[-0.5], [2.0]], dtype=torch.float64))
    assert_oracle(fast(x), a, line, torch.tensor([-0.5, 2.0], dtype=torch.float64), x)


def test_coordinates_written_in_place_are_read_afresh():
    a, line = line_of(mlp)
    fast = MultiPointModel(a, line, torch.tensor([[0.0], [1.0]]))
    x = torch.randn(3, 4, dtype=torch.float64)
    fast(x)
    fast.context.coeffs.copy_(torch.tensor([[0.25], [0.75]], dtype=torch.float64))
    fast.coords = fast.context.coeffs.clone()
    assert_oracle(fast(x), a, line, torch.tensor([0.25, 0.75], dtype=torch.float64), x)


@pytest.fixture
def fp32_precision():
    """Sets PyTorch's TF32 settings for cuDNN's convolutions and for matmuls in the newer
    API where this torch has it, else through the allow_tf32 flags; restores them after."""
    backends = torch.backends
    new_api = hasattr(backends.cuda.matmul, "fp32_precision")
    if new_api:
        levels = (backends, backends.cudnn, backends.cudnn.conv, backends.cuda.matmul)
        saved = [level.fp32_precision for level in levels]
    else:
        saved = [backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32]

    def set_precision(conv: bool, matmul: bool) -> None:
        if new_api:
            backends.cudnn.conv.fp32_precision = "tf32" if conv else "ieee"
            backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
        else:
            backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = conv, matmul

    yield set_precision
    if new_api:
        for level, value in zip(levels, saved):
            level.fp32_precision = value
    else:
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = saved


def test_float32_on_a_gpu_rounding_to_tf32_is_checked_at_tf32s_rounding(fp32_precision):
    """cuDNN's convolutions round float32 to TF32 by PyTorch's default: on an H200 the check
    found W2's ResNet-20 and itself 1.25e-3 apart and fell back. The check allows that
    where a GPU may round so (matmuls where allowed; convolutions for a model that has
    them), and float32's own rounding elsewhere: a model without convolutions keeps it
    under PyTorch's defaults."""
    from mlifast.multipoint.reference import close, relative_tolerance, rounds_float32_to_tf32
    assert relative_tolerance(torch.float32, tf32=False) < 1.25e-3 <= relative_tolerance(torch.float32, tf32=True)
    assert relative_tolerance(torch.float64, tf32=True) == relative_tolerance(torch.float64, tf32=False)
    a = torch.ones(3)
    assert close(a * 1.002, a) is False and close(a * 1.002, a, tf32=True) is False  # (a CPU tensor)
    fp32_precision(conv=True, matmul=False)  # PyTorch's defaults
    assert rounds_float32_to_tf32(convolutions=True) and not rounds_float32_to_tf32(convolutions=False)
    assert rounds_float32_to_tf32(convolutions=False, recurrent=True)  # (cuDNN's RNNs)
    fp32_precision(conv=False, matmul=False)  # (the old flags raise here on torch >= 2.9)
    assert not rounds_float32_to_tf32(convolutions=True)
    fp32_precision(conv=False, matmul=True)
    assert rounds_float32_to_tf32(convolutions=False)


_INF, _NAN = float("inf"), float("nan")


@pytest.mark.parametrize("a, b, agree", [
    ([1.0, 1000.0], [1.5, 1000.0], True), ([1.0, 1000.0], [2.5, 1000.0], False),  # within 1e-3 of the largest
    ([_NAN, 1.0], [_NAN, 1.0], True), ([_NAN, 1.0], [0.0, 1.0], False), ([0.0, 1.0], [_NAN, 1.0], False),
    ([_INF, 1.0], [_INF, 1.0], True), ([-_INF, 1.0], [_INF, 1.0], False), ([_INF, 1.0], [1e30, 1.0], False),
    ([1e30, 1.0], [_INF, 1.0], False), ([_INF, _NAN], [_INF, _NAN], True), ([], [], True),
    ([1e-40, 0.0], [0.0, 0.0], True)])
def test_the_check_compares_within_rounding_and_nan_and_infinity_alike(a, b, agree):
    from mlifast.multipoint.reference import close

    assert close(torch.tensor(a), torch.tensor(b)) is agree
    assert close(torch.tensor([1, 2]), torch.tensor([1, 2])) and not close(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_an_input_the_model_itself_cannot_take_raises_the_models_own_error():
    """An image too small for the second convolution (1×1 after the first's stride 4; as
    the linear layer of each point's patches, its rule unfolds them first): the user sees
    what running the model gives, not an error from inside a rule."""
    a, line = line_of(lambda: nn.Sequential(nn.Conv2d(3, 128, 4, 4), nn.Conv2d(128, 128, 2, 2)))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError) as own:
        a(x)
    fast = mlifast.interpolate(a, line, torch.linspace(0, 1, 3))
    with pytest.raises(RuntimeError) as raised:
        fast(x)
    assert str(raised.value) == str(own.value)
