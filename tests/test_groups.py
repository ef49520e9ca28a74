"""Points run in groups (MultiPointModel.points_per_group, chosen by evaluate on the CPU),
what is shared by every point kept between the groups, activations fused in place."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlifast
from mlifast.multipoint.context import PointContext
from mlifast.multipoint.layers import InPlaceActivation
from models import (LayerScaleBlock, LSTMLanguageModel, ResNet20, SignalNet, TransformerClassifier, mlp,
                    randomize_bn, vgg_like)
from oracle import load_point, oracle_outputs, rel_err
from test_evaluate import batches, loop_evaluate


def pair(factory, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    a = randomize_bn(factory(), seed).to(dtype).eval()
    torch.manual_seed(seed + 1)
    b = randomize_bn(factory(), seed + 1).to(dtype).eval()
    return a, b


def grouped_and_whole(model, space, coords, *args, group):
    whole = mlifast.interpolate(model, space, coords)
    grouped = mlifast.interpolate(model, space, coords)
    grouped.points_per_group = group
    with torch.no_grad():
        return grouped(*args), whole(*args)


def same(a, b, tol=1e-12):
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and rel_err(a, b) < tol, (a.shape, b.shape)
    else:
        for x, y in zip(a, b):
            same(x, y, tol)


CASES = {
    "mlp": (mlp, lambda g: (torch.randn(7, 3, 4, generator=g, dtype=torch.float64),)),
    "resnet20": (ResNet20, lambda g: (torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64),)),
    "vgg": (vgg_like, lambda g: (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64),)),
    "layerscale": (LayerScaleBlock, lambda g: (torch.randn(3, 5, 8, generator=g, dtype=torch.float64),)),
    "lstm": (LSTMLanguageModel, lambda g: (torch.randint(0, 11, (3, 7), generator=g),)),
    "signal": (SignalNet, lambda g: (torch.randn(3, 2, 8, generator=g, dtype=torch.float64),
                                     torch.randn(3, 1, 4, 4, 4, generator=g, dtype=torch.float64))),
    "transformer": (TransformerClassifier, lambda g: (torch.randint(1, 13, (3, 6), generator=g),
                                                      torch.tensor([[False] * 6, [False] * 4 + [True] * 2,
                                                                    [False] * 3 + [True] * 3]))),
}


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_groups_give_the_points_answers(name, group):
    factory, make_args = CASES[name]
    a, b = pair(factory)
    args = make_args(torch.Generator().manual_seed(3))
    coords = torch.linspace(-0.25, 1.25, 5)
    out, whole = grouped_and_whole(a, mlifast.Line(a, b), coords, *args, group=group)
    same(out, whole)
    for k, e in enumerate(oracle_outputs(a, mlifast.Line(a, b), coords, *args)):
        assert rel_err(out[k], e) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_groups_on_a_plane(dtype):
    a, b = pair(mlp, dtype)
    _, c = pair(mlp, dtype, seed=7)
    plane = mlifast.Plane.through(a, b, c)
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, -0.4], [1.2, 0.5]], dtype=torch.float64)
    x = torch.randn(9, 3, 4, dtype=dtype)
    out, whole = grouped_and_whole(a, plane, coords, x, group=2)
    same(out, whole, 1e-12 if dtype == torch.float64 else 1e-5)


class StructuredOutput(nn.Module):
    """Returns a dict holding a tensor, a tuple of an integer tensor and a tensor, and a
    non-tensor value."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return {"y": y, "pair": (y.argmax(-1), torch.tanh(y)), "note": "per example"}


def test_groups_keep_the_structure_of_the_outputs():
    """Each group's outputs are copied into (K, …) outputs allocated at the first group:
    every tensor of the structure, integer ones too; other values as the model gave them."""
    a, b = pair(StructuredOutput)
    x = torch.randn(6, 4, dtype=torch.float64)
    coords = torch.linspace(0, 1, 5)
    out, whole = grouped_and_whole(a, mlifast.Line(a, b), coords, x, group=2)
    assert out["note"] == "per example" and out["pair"][0].dtype == torch.int64
    same(out["y"], whole["y"])
    assert torch.equal(out["pair"][0], whole["pair"][0])
    same(out["pair"][1], whole["pair"][1])
    for k, e in enumerate(oracle_outputs(a, mlifast.Line(a, b), coords, x)):
        assert rel_err(out["y"][k], e["y"]) < 1e-12


def test_shared_first_layer_is_computed_once_per_call(monkeypatch):
    a, b = pair(mlp)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 6))
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        fast(x)  # the first call also runs the checks
        fast.points_per_group = 2
        calls = []
        linear = F.linear
        monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(a[1].shape) or linear(*a, **k))
        fast(x)
    assert calls == [(16, 12), (16, 12)]  # x·Wᵀ and x·Dᵀ of the first layer, once for 3 groups


def test_reuse_matches_tensors_by_memory_and_version():
    context = PointContext(torch.zeros(2, 1, dtype=torch.float64))
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    count = []

    def compute():
        count.append(1)
        return x @ w.t()

    assert context.reuse(compute, x, w) is not context.reuse(compute, x, w)  # not grouped: no reuse
    context.grouped = True
    first = context.reuse(compute, x, w)
    assert context.reuse(compute, x.view(3, 4), w) is first  # another view of the same memory
    assert context.reuse(compute, x, w, owner=object()) is not first  # another module
    assert context.reuse(compute, x[:2], w) is not first
    x.add_(1)  # written in place: a new version
    assert context.reuse(compute, x, w) is not first
    with torch.inference_mode():
        y = torch.randn(3, 4)
    context.reuse(compute, y, w)  # no version counter: computed each time
    context.reuse(compute, y, w)
    assert len(count) == 8
    context.forget()
    assert context._kept == {}


@pytest.mark.parametrize("forward", [None, lambda model, batch: (model(batch[0]), batch[1])])
@pytest.mark.parametrize("bn", ["interpolate", "recompute", "batch"])
def test_evaluate_in_groups_matches_the_loop(bn, forward, monkeypatch):
    """Without a forward of the user's, the loss takes each group's outputs as the group
    is computed (on the first call, once its check agreed: the groups of its first and
    last point first); with one, the outputs of all points, one point at a time where they
    are large (LOSS_BYTES)."""
    import importlib

    from mlifast.engine import chunking

    evaluation = importlib.import_module("mlifast.engine.evaluate")  # (the module, not its function)

    torch.manual_seed(0)
    a = randomize_bn(ResNet20(width=4, num_classes=5), 0).double().eval()
    torch.manual_seed(1)
    b = randomize_bn(ResNet20(width=4, num_classes=5), 1).double().eval()
    data = batches(n=12, batch=4, shape=(3, 8, 8))
    line = mlifast.Line(a, b)
    sizes = []
    run = mlifast.MultiPointModel._run
    monkeypatch.setattr(mlifast.MultiPointModel, "_run",
                        lambda self, *a, **k: sizes.append(self.context.num_active) or run(self, *a, **k))
    monkeypatch.setattr(chunking, "CPU_GROUP_BYTES", 1)  # one point per group
    monkeypatch.setattr(evaluation, "LOSS_BYTES", 1)  # the loss on one point's outputs at a time
    losses_of = []
    add_sums = evaluation._add_sums
    monkeypatch.setattr(evaluation, "_add_sums", lambda sums, first, output, *rest: losses_of.append(
        (first, output.shape[0])) or add_sums(sums, first, output, *rest))
    res = mlifast.evaluate(a, line, data, coords=3, bn=bn, forward=forward, progress=False)
    assert sizes[-3:] == [1, 1, 1]  # the last batch: its three points a group each
    assert losses_of[-3:] == ([(0, 1), (1, 1), (2, 1)] if forward is None else [(0, 3)] * 3)
    if forward is None:  # the first batch (checked, unless the "collect" pass of "recompute" was)
        assert losses_of[:3] == ([(0, 1), (1, 1), (2, 1)] if bn == "recompute" else [(0, 1), (2, 1), (1, 1)])
    losses, accs = loop_evaluate(a, line, data, res.alphas.tolist(), bn)
    torch.testing.assert_close(res["loss"], losses, rtol=1e-9, atol=0)
    torch.testing.assert_close(res["accuracy"], accs, rtol=0, atol=1e-12)


def test_a_check_whose_outputs_are_set_aside_runs_only_the_groups_of_its_two_points(monkeypatch):
    """bn="recompute" with bn_data in batches of another size: the evaluating pass's first
    batch is a shape of its own, checked with the recomputed statistics set aside (the
    check's outputs are not the call's): only the groups of points 0 and 4 run for it."""
    from mlifast.engine import chunking

    a, b = pair(lambda: ResNet20(width=4, num_classes=5))
    data, bn_data = batches(n=8, batch=4, shape=(3, 8, 8)), batches(n=12, batch=6, shape=(3, 8, 8), seed=1)
    line = mlifast.Line(a, b)
    runs = []
    run = mlifast.MultiPointModel._run
    monkeypatch.setattr(mlifast.MultiPointModel, "_run", lambda self, *a, **k: runs.append(
        (self.context.active_span, self.context.bn_mode)) or run(self, *a, **k))
    monkeypatch.setattr(chunking, "CPU_GROUP_BYTES", 1)  # one point per group
    res = mlifast.evaluate(a, line, data, coords=5, bn="recompute", bn_data=bn_data, progress=False)
    every_point = [(k, k + 1) for k in range(5)]
    assert runs[1:] == ([(span, "collect") for span in [(0, 1), (4, 5), (1, 2), (2, 3), (3, 4)] + every_point]
                        + [(span, "running") for span in [(0, 1), (4, 5)] + every_point * 2])  # (after the probe)
    losses, accs = loop_evaluate(a, line, data, res.alphas.tolist(), "recompute", bn_data)
    torch.testing.assert_close(res["loss"], losses, rtol=1e-9, atol=0)
    torch.testing.assert_close(res["accuracy"], accs, rtol=0, atol=1e-12)


def test_evaluate_sizes_groups_by_the_cache_budget(monkeypatch):
    from mlifast.engine import chunking

    a, b = pair(mlp)
    line, data = mlifast.Line(a, b), batches()
    fast = mlifast.MultiPointModel(a, line, 1)
    point = chunking.bytes_per_point(fast, data[0], lambda m, batch: (m(batch[0]), batch[1]), torch.device("cpu"))
    assert point.live < point.activations  # (the MLP's layers: several outputs, not all alive at once)
    monkeypatch.setattr(chunking, "CPU_GROUP_BYTES", 2 * point.live)
    monkeypatch.setattr(chunking, "weight_bytes", lambda space: 0)  # (its floor: test_first_call_check)
    per_pass, group = chunking.plan(fast, data, lambda m, batch: (m(batch[0]), batch[1]), torch.device("cpu"))
    assert group == 2 and per_pass >= 5
    assert chunking.plan(fast, [], None, torch.device("cpu")) == (1, None)
    res = mlifast.evaluate(a, line, data, coords=5, progress=False)
    losses, _ = loop_evaluate(a, line, data, res.alphas.tolist(), "interpolate")
    torch.testing.assert_close(res["loss"], losses, rtol=1e-9, atol=0)


def test_model_writing_into_its_inputs_in_groups():
    class ClampInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x.clamp_(-0.5, 0.5)
            return self.fc(x)

    torch.manual_seed(0)
    a, b = ClampInputs().double(), ClampInputs().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    before = x.clone()
    out, whole = grouped_and_whole(a, mlifast.Line(a, b), torch.linspace(0, 1, 5), x, group=2)
    same(out, whole)
    assert torch.equal(x, before)


def test_activations_after_fused_layers_join_them_or_work_in_place():
    a, b = pair(vgg_like)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 3))
    kinds = [type(m).__name__ for m in fast.model]
    assert kinds[1:3] == ["BatchNormRule", "InPlaceActivation"]
    assert kinds[5:7] == ["GroupNorm", "ReLU"]  # equal at both ends: frozen, not a rule
    a, b = pair(mlp)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 3))
    assert fast.model[1].relu and isinstance(fast.model[2], nn.Identity)  # Linear → ReLU: in the op
    assert not fast.model[4].relu and isinstance(fast.model[5], InPlaceActivation)  # Linear → Tanh
    assert isinstance(fast.model[3], nn.Dropout)


IN_PLACE_ACTIVATIONS = [nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.SiLU(), nn.Hardswish(), nn.ReLU6(),
                        nn.Hardtanh(-2.0, 3.0), nn.LeakyReLU(0.2), nn.ELU(0.7)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", IN_PLACE_ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_every_in_place_activation_after_a_rule_equals_the_model(act, dtype):
    """After a convolution, a batch norm, a group norm and a linear layer, each activation
    works in place on the rule's output (with its own arguments), giving the model's
    outputs, a NaN pixel's included."""
    def net():
        group_norm = nn.GroupNorm(2, 8)
        nn.init.normal_(group_norm.weight), nn.init.normal_(group_norm.bias)  # (moving: a rule)
        return nn.Sequential(nn.Conv2d(3, 8, 3), copy.deepcopy(act), nn.BatchNorm2d(8), copy.deepcopy(act),
                             nn.Conv2d(8, 8, 3), group_norm, copy.deepcopy(act), nn.Flatten(),
                             nn.Linear(8 * 6 * 6, 16), copy.deepcopy(act), nn.Linear(16, 3))

    a, b = pair(net, dtype)
    line, coords = mlifast.Line(a, b), torch.tensor([-0.3, 0.0, 0.5, 1.0])
    fast = mlifast.interpolate(a, line, coords)
    in_place = [i for i, m in enumerate(fast.model) if isinstance(m, InPlaceActivation)]
    assert in_place == ([1, 3, 6] if type(act) is nn.ReLU else [1, 3, 6, 9])  # (Linear → ReLU: in the op)
    x = torch.randn(5, 3, 10, 10, dtype=dtype) * 3
    x[1, 2, 3, 4] = float("nan")
    with torch.no_grad():
        out = fast(x)
    assert not fast.per_point_fallback  # (the first-call check agreed: the in-place forms ran)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        torch.testing.assert_close(out[k], expected, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("act", [nn.LeakyReLU(-0.1), nn.ELU(-0.5), nn.SiLU()], ids=lambda m: repr(m))
def test_in_place_activations_keep_gradients(act):
    """Gradients through the in-place forms equal the model's (PyTorch has no in-place
    backward for a negative slope or alpha: those run out of place)."""
    def net():
        return nn.Sequential(nn.Linear(4, 8), copy.deepcopy(act), nn.Linear(8, 2))

    a, b = pair(net)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    fast = mlifast.interpolate(a, line, coords)
    assert isinstance(fast.model[1], InPlaceActivation)
    fast.shares_rows = False  # (shared rows are leaves: no input gradient)
    (fast(x) ** 2).sum().backward()
    expected = torch.zeros_like(x)
    for c in coords.tolist():
        x2 = x.detach().clone().requires_grad_()
        (load_point(a, line, c)(x2) ** 2).sum().backward()
        expected += x2.grad
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


def test_a_relu_joins_only_the_use_of_a_shared_linear_layer_before_it():
    """The same Linear twice in the model, once before a ReLU: each place has its own
    rule, and only that one applies the ReLU. The oracle's answer."""
    def shared_linear():
        inner = nn.Linear(8, 8)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), inner, nn.ReLU(), inner, nn.Linear(8, 3))

    a, b = pair(shared_linear)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 3)
    fast = mlifast.interpolate(a, line, coords)
    assert fast.model[2].relu and isinstance(fast.model[3], nn.Identity) and not fast.model[4].relu
    x = torch.randn(5, 4, dtype=torch.float64)
    out = fast(x)
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], expected) < 1e-10


def test_activation_with_a_hook_is_not_fused():
    a, b = pair(mlp)
    seen = []
    a[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 3))
    assert isinstance(fast.model[2], nn.ReLU)
    assert isinstance(fast.model[5], InPlaceActivation)


def test_in_place_activation_keeps_gradients():
    a, b = pair(mlp)
    line = mlifast.Line(a, b)
    x = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for group in (None, 2):
        fast = mlifast.interpolate(a, line, torch.linspace(0, 1, 5))
        fast.points_per_group, fast.shares_rows = group, False  # (shared rows are leaves: no input gradient)
        x.grad = None
        (fast(x) ** 2).sum().backward()
        grads.append(x.grad.clone())
    expected = torch.zeros_like(x)
    for c in torch.linspace(0, 1, 5).tolist():
        m = load_point(a, line, c)  # the model itself, with its out-of-place activations
        x2 = x.detach().clone().requires_grad_()
        (m(x2) ** 2).sum().backward()
        expected += x2.grad
    for g in grads:
        assert rel_err(g, expected) < 1e-10


def test_the_first_call_runs_the_model_once_besides_its_checks(monkeypatch):
    a, b = pair(mlp)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 4))
    runs = []
    groups = mlifast.MultiPointModel._groups
    monkeypatch.setattr(mlifast.MultiPointModel, "_groups",
                        lambda self, *a, **k: runs.append(1) or groups(self, *a, **k))
    with torch.no_grad():
        fast(torch.randn(3, 3, 4, dtype=torch.float64))
    assert len(runs) == 1  # the checked outputs are the call's outputs


def consumed_groups(fast, *args):
    """[(first point, outputs, earlier outputs still alive)] of each group `fast`'s call
    hands to outputs_to's consumer (which keeps only weak references)."""
    import weakref
    seen, handed = [], []

    def consume(start, out):
        handed.append((start, out.clone(), sum(r() is not None for r in seen)))
        seen.append(weakref.ref(out))

    with torch.no_grad(), fast.outputs_to(consume):
        assert fast(*args) is None
    return handed


def test_the_first_call_checks_the_groups_holding_its_two_points_first_then_streams_the_rest():
    """Of 7 points in groups of 2, the check's points 0 and 6 are in the first and last
    group: those run first, and every group goes to the consumer once the check agrees, one
    at a time (no (K, …) outputs put together: a language model's logits take 93 MB a point)."""
    a, b = pair(mlp)
    line, coords = mlifast.Line(a, b), torch.linspace(-0.5, 1.5, 7)
    fast = mlifast.interpolate(a, line, coords)
    fast.points_per_group = 2
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    for call in range(2):  # checked, then not
        handed = consumed_groups(fast, x)
        assert [start for start, _, _ in handed] == ([0, 6, 2, 4] if call == 0 else [0, 2, 4, 6])
        assert all(alive == 0 for _, _, alive in handed)
        expected = oracle_outputs(a, line, coords, x)
        for start, out, _ in handed:
            assert out.shape[0] == min(2, 7 - start)
            for k, point in enumerate(out, start):
                assert rel_err(point, expected[k]) < 1e-12


class CountsTwoPointGroups(nn.Module):
    """Adds 1 where its activation has 8 rows: only in the last of the groups of 3 of 5
    points of 4 rows."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h + float(h.shape[0] == 8)


def test_a_check_disagreeing_in_the_last_group_hands_nothing_of_the_first_to_the_consumer():
    a, b = pair(CountsTwoPointGroups)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 5)
    fast = mlifast.interpolate(a, line, coords)
    fast.points_per_group = 3
    x = torch.randn(4, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="at point #4"):
        handed = consumed_groups(fast, x)
    assert fast.per_point_fallback and [(start, len(out)) for start, out, _ in handed] == [(0, 5)]
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(handed[0][1][k], expected) < 1e-12


def interrupt_the_reference_once(fast):
    """The model itself (the check's reference) raises KeyboardInterrupt on its next run
    (Ctrl-C while it computes), then runs as before."""
    at = fast.reference.at

    def interrupted(*args):
        fast.reference.at = at
        raise KeyboardInterrupt

    fast.reference.at = interrupted


def test_an_interrupted_check_leaves_no_group_active_and_is_made_again():
    """Interrupted while comparing its first groups, the check leaves every point active
    and nothing kept, and the next call of the same shape is checked again (here it falls
    back to one point at a time: marked checked, it would give wrong outputs)."""
    a, b = pair(CountsTwoPointGroups)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 5)
    fast = mlifast.interpolate(a, line, coords)
    fast.points_per_group = 3
    x = torch.randn(4, 4, dtype=torch.float64)
    interrupt_the_reference_once(fast)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        fast(x)
    assert not fast.context.grouped and fast.context.active_span == (0, 5) and not fast.context._kept
    with pytest.warns(RuntimeWarning, match="at point #4"), torch.no_grad():
        out = fast(x)  # (while the interrupt's traceback, and with it the check's frames, is alive)
    del interrupt
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], expected) < 1e-12


def test_the_references_state_is_dropped_before_the_other_groups_run():
    a, b = pair(mlp)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 7))
    fast.points_per_group = 2
    states = []
    with torch.no_grad(), fast.outputs_to(lambda start, out: states.append((start, fast.reference._state))):
        fast(torch.randn(3, 3, 4, dtype=torch.float64))
    assert [start for start, _ in states] == [0, 6, 2, 4] and all(state is None for _, state in states)


class KeepsHiddenStates(nn.Module):
    """Returns the mean of every hidden state: all of them alive at once at the end."""

    def __init__(self, layers: int = 6, width: int = 32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers))

    def forward(self, x):
        hidden = []
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return torch.stack(hidden).mean(0)


def test_groups_count_the_outputs_alive_at_once():
    """A chain frees each output once the next exists; a model keeping every hidden state
    holds them all at its peak, and its groups are sized by that."""
    from mlifast.engine import chunking

    forward = lambda m, batch: (m(batch[0]), None)  # noqa: E731
    x = torch.randn(64, 32, dtype=torch.float64)
    output = 64 * 32 * 8
    # a chain: a block's input, its Linear's output and its ReLU's; keeping: 6 hidden states
    # and the last Linear's output (or the model's)
    for model, live in ((nn.Sequential(*(nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(6))), 3),
                        (KeepsHiddenStates(), 7)):
        model = model.double()
        fast = mlifast.MultiPointModel(model, mlifast.Line(model, copy.deepcopy(model)), 1)
        point = chunking.bytes_per_point(fast, (x, None), forward, torch.device("cpu"))
        assert point.live == live * output, (type(model).__name__, point.live / output)


def test_a_group_stays_within_half_the_memory_budget(monkeypatch):
    from mlifast.engine import chunking

    forward = lambda m, batch: (m(batch[0]), None)  # noqa: E731
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).double()
    fast = mlifast.MultiPointModel(model, mlifast.Line(model, copy.deepcopy(model)), 1)
    data = [(torch.randn(64, 32, dtype=torch.float64), None)]
    point = chunking.bytes_per_point(fast, data[0], forward, torch.device("cpu"))
    monkeypatch.setattr(chunking, "weight_bytes", lambda space: 0)
    assert chunking.plan(fast, data, forward, torch.device("cpu"))[1] == chunking.CPU_GROUP_BYTES // point.live
    monkeypatch.setattr(chunking, "memory_budget", lambda device: 2 * 3 * point.activations)
    per_pass, group = chunking.plan(fast, data, forward, torch.device("cpu"))
    assert group == 3 and per_pass >= 1  # (the rest of the budget: the passes' points)


def test_points_whose_outputs_fill_a_cores_cache_run_in_groups_of_twice_the_bytes(monkeypatch):
    """An output alone of CPU_STREAMING_OUTPUT_BYTES or more streams through memory whatever
    the group: such points' groups hold twice CPU_GROUP_BYTES (the largest output counted)."""
    from mlifast.engine import chunking

    forward = lambda m, batch: (m(batch[0]), None)  # noqa: E731
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).double()
    fast = mlifast.MultiPointModel(model, mlifast.Line(model, copy.deepcopy(model)), 1)
    data = [(torch.randn(64, 32, dtype=torch.float64), None)]
    point = chunking.bytes_per_point(fast, data[0], forward, torch.device("cpu"))
    assert point.largest == 64 * 64 * 8
    monkeypatch.setattr(chunking, "weight_bytes", lambda space: 0)
    monkeypatch.setattr(chunking, "CPU_GROUP_BYTES", 6 * point.live)
    for threshold, group in ((point.largest + 1, 6), (point.largest, 12)):
        monkeypatch.setattr(chunking, "CPU_STREAMING_OUTPUT_BYTES", threshold)
        assert chunking.plan(fast, data, forward, torch.device("cpu"))[1] == group


def test_the_probe_of_sizes_computes_no_linear_layer(monkeypatch):
    """Linear layers at points give zeros of their shape while the probe measures sizes:
    the same PointBytes as a probe that computes them, without one multipoint_linear."""
    from mlifast.engine import chunking
    from mlifast.multipoint import context as point_context
    from mlifast.multipoint import model as point_model

    calls = []
    counted = point_context.multipoint_linear
    monkeypatch.setattr(point_context, "multipoint_linear", lambda *a, **k: calls.append(1) or counted(*a, **k))
    forward = lambda m, batch: (m(*batch), None)  # noqa: E731
    tokens = torch.randint(1, 13, (6, 7))
    for factory, x in ((mlp, (torch.randn(64, 12, dtype=torch.float64),)),
                       (TransformerClassifier, (tokens, tokens == 1)), (LSTMLanguageModel, (tokens % 11,))):
        model = factory().double().eval()
        fast = mlifast.MultiPointModel(model, mlifast.Line(model, factory().double().eval()), 3)
        calls.clear()
        point = chunking.bytes_per_point(fast, x, forward, torch.device("cpu"))
        assert calls == [], factory.__name__
        unchecked = point_model.MultiPointModel.unchecked
        monkeypatch.setattr(point_model.MultiPointModel, "unchecked",
                            lambda self, layout=False, sizes_only=False: unchecked(self, layout, False))
        computed = chunking.bytes_per_point(fast, x, forward, torch.device("cpu"))
        monkeypatch.setattr(point_model.MultiPointModel, "unchecked", unchecked)
        assert calls and point == computed, factory.__name__


def test_a_model_raising_on_zeros_is_probed_with_its_values():
    """The probe's zeros are not the model's values: where they make it raise, the probe
    computes the linear layers, with the same sizes."""
    from mlifast.engine import chunking

    class RaisesOnZeros(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 16)

        def forward(self, x):
            h = self.fc(x)
            if not bool(h.abs().sum() > 0):
                raise ValueError("all-zero activations")
            return h

    model = RaisesOnZeros().double()
    fast = mlifast.MultiPointModel(model, mlifast.Line(model, RaisesOnZeros().double()), 3)
    point = chunking.bytes_per_point(fast, (torch.randn(8, 12, dtype=torch.float64),), lambda m, b: (m(*b), None),
                                     torch.device("cpu"))
    assert point.largest == 8 * 16 * 8

