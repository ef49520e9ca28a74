"""evaluate(): per-point means over a data set against the one-point-at-a-time loop."""
import copy
import functools
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

import mlifast
from models import ResNet20, mlp, randomize_bn
from oracle import load_point


def batches(n=23, batch=5, shape=(3, 4), classes=5, seed=0):
    """n examples in batches of `batch` (the last one smaller)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def loop_evaluate(model, space, data, alphas, bn, bn_data=None):
    """The oracle: per point, load θ(α) (recompute: update_bn on bn_data, default data),
    run every batch."""
    losses, accs = [], []
    for a in alphas:
        m = load_point(model, space, a)
        if bn == "recompute":
            update_bn(data if bn_data is None else bn_data, m)
        m.train(bn == "batch")
        n, total, hits = 0, 0.0, 0.0
        with torch.no_grad():
            for x, y in data:
                out = m(x)
                total += F.cross_entropy(out, y, reduction="sum").item()
                hits += (out.argmax(1) == y).sum().item()
                n += len(y)
        losses.append(total / n)
        accs.append(hits / n)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64)


def resnet_pair():
    torch.manual_seed(0)
    a = randomize_bn(ResNet20(width=4, num_classes=5), 0).double().eval()
    torch.manual_seed(1)
    b = randomize_bn(ResNet20(width=4, num_classes=5), 1).double().eval()
    return a, b


def assert_matches_the_loop(a, b, data, bn, coords=4):
    """evaluate's loss and accuracy on the line a → b equal loop_evaluate's."""
    line = mlifast.Line(a, b)
    res = mlifast.evaluate(a, line, data, coords=coords, bn=bn, progress=False)
    losses, accs = loop_evaluate(a, line, data, res.alphas.tolist(), bn)
    torch.testing.assert_close(res["loss"], losses, rtol=1e-9, atol=0)
    torch.testing.assert_close(res["accuracy"], accs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bn", ["interpolate", "recompute", "batch"])
def test_bn_policies_match_the_loop(bn):
    a, b = resnet_pair()
    assert_matches_the_loop(a, b, batches(n=14, batch=4, shape=(3, 8, 8)), bn)


def test_chunks_give_the_same_numbers():
    a, b = resnet_pair()
    data = batches(n=9, batch=4, shape=(3, 8, 8))
    line = mlifast.Line(a, b)
    whole = mlifast.evaluate(a, line, data, coords=5, bn="recompute", progress=False)
    chunked = mlifast.evaluate(a, line, data, coords=5, bn="recompute", max_points_per_pass=2, progress=False)
    torch.testing.assert_close(whole["loss"], chunked["loss"], rtol=1e-12, atol=0)


def test_mlp_plane_float32():
    torch.manual_seed(0)
    models = [mlp().eval() for _ in range(3)]
    plane = mlifast.Plane.through(*models)
    data = [(x.float(), y) for x, y in batches()]
    res = mlifast.evaluate(models[0], plane, data, coords=3, progress=False)
    assert res.coords.shape == (9, 2)
    for k, c in enumerate(res.coords.tolist()):
        m = load_point(models[0], plane, c)
        expected = sum(F.cross_entropy(m(x), y, reduction="sum").item() for x, y in data) / 23
        assert math.isclose(res["loss"][k].item(), expected, rel_tol=1e-5)


def test_custom_metric_dict_batches_and_save_load(tmp_path):
    torch.manual_seed(0)
    a, b = mlp().double().eval(), mlp().double().eval()
    data = [{"x": x, "labels": y} for x, y in batches()]

    class Wrapped(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    wa, wb = Wrapped(a), Wrapped(b)
    margin = lambda out, y: out.gather(1, y[:, None])[:, 0] - out.logsumexp(1)  # noqa: E731
    res = mlifast.evaluate(wa, mlifast.Line(wa, wb), data, coords=[0.0, 1.0], metrics=("accuracy", margin),
                           progress=False)
    assert set(res.keys()) == {"loss", "accuracy", "<lambda>"}
    torch.testing.assert_close(res["<lambda>"], -res["loss"], rtol=1e-12, atol=1e-12)
    path = tmp_path / "res.json"
    res.save(path)
    again = mlifast.load(path)
    torch.testing.assert_close(again["loss"], res["loss"], rtol=0, atol=0)
    assert json.loads(path.read_text())["meta"]["examples"] == 23
    assert again.meta["space"]["kind"] == "line"


def test_metrics_named_by_a_dict_and_clashing_names_refused():
    torch.manual_seed(0)
    a, b = mlp().double().eval(), mlp().double().eval()
    line, data = mlifast.Line(a, b), batches()
    margin = lambda out, y: out.gather(1, y[:, None])[:, 0] - out.logsumexp(1)  # noqa: E731
    errors = lambda out, y: (out.argmax(1) != y).double()  # noqa: E731
    res = mlifast.evaluate(a, line, data, coords=3, metrics={"margin": margin, "errors": errors, "acc": "accuracy"},
                           progress=False)
    assert list(res.keys()) == ["loss", "margin", "errors", "acc"]
    torch.testing.assert_close(res["margin"], -res["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res["errors"], 1 - res["acc"], rtol=0, atol=1e-15)
    assert list(mlifast.evaluate(a, line, data, coords=2, metrics="accuracy", progress=False).keys()) == [
        "loss", "accuracy"]
    assert list(mlifast.evaluate(a, line, data, coords=2, metrics=None, progress=False).keys()) == ["loss"]

    def loss(out, y):
        return errors(out, y)
    for clash in ((margin, errors), (loss,)):
        with pytest.raises(ValueError, match="two results would be named"):
            mlifast.evaluate(a, line, data, coords=2, metrics=clash, progress=False)


def test_a_metric_or_target_that_does_not_fit_the_batch_is_named_in_its_terms():
    torch.manual_seed(0)
    a, b = mlp().double().eval(), mlp().double().eval()
    line, data = mlifast.Line(a, b), batches(n=5)
    batch_mean = lambda out, y: (out.argmax(1) == y).double().mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"metric '<lambda>' returned shape \(\) on a batch of 5 examples"):
        mlifast.evaluate(a, line, data, coords=7, metrics=(batch_mean,), progress=False)
    short = [(x, y[:4]) for x, y in data]
    with pytest.raises(ValueError, match="the target holds 4 examples where the model's output holds 5"):
        mlifast.evaluate(a, line, short, coords=7, progress=False)


def test_nan_loss_is_recorded_for_that_point_only():
    torch.manual_seed(0)
    a, b = mlp().double().eval(), mlp().double().eval()
    with torch.no_grad():
        b[-1].bias.fill_(1e308)  # overflow only far along the line
    line = mlifast.Line(a, b)
    with pytest.warns(RuntimeWarning, match="not finite at"):
        res = mlifast.evaluate(a, line, batches(), coords=[0.0, 0.5, 1e3], progress=False)
    assert torch.isfinite(res["loss"][:2]).all() and not torch.isfinite(res["loss"][2])
    losses, _ = loop_evaluate(a, line, batches(), [0.0, 0.5], "interpolate")
    torch.testing.assert_close(res["loss"][:2], losses, rtol=1e-9, atol=0)


def test_non_finite_values_are_saved_as_strict_json_and_read_back(tmp_path):
    values = torch.tensor([0.25, float("nan"), float("inf"), float("-inf")], dtype=torch.float64)
    res = mlifast.Results(torch.linspace(0, 1, 4, dtype=torch.float64).unsqueeze(1), {"loss": values},
                          {"note": float("inf")})
    path = tmp_path / "res.json"
    res.save(path)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    raw = json.loads(path.read_text(), parse_constant=refuse)
    assert raw["values"]["loss"] == [0.25, None, "inf", "-inf"] and raw["meta"]["note"] == "inf"
    torch.testing.assert_close(mlifast.load(path)["loss"], values, rtol=0, atol=0, equal_nan=True)


def test_result_files_are_read_back_whole_or_refused_by_name(tmp_path):
    res = mlifast.Results(torch.tensor([[0.0], [1.0]], dtype=torch.float64),
                          {"loss": torch.tensor([1.0, 2.0], dtype=torch.float64)})
    path = tmp_path / "res.json"
    res.save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # (as open() makes files: not the owner's alone)
    text = path.read_text()
    cases = {"truncated": text[: len(text) // 2], "a list": "[1, 2]", "no values": text.replace('"values"', '"v"'),
             "newer": text.replace('"format": 1', '"format": 99'), "older": text.replace('"format": 1', '"format": 0'),
             "format true": text.replace('"format": 1', '"format": true'),
             "short": text.replace("1.0,\n   2.0", "1.0")}
    for name, bad in cases.items():
        broken = tmp_path / f"{name}.json"
        broken.write_text(bad)
        with pytest.raises(ValueError, match=str(broken)):
            mlifast.load(broken)
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not an mlifast result file"):
        mlifast.load(tmp_path / "weights.pt")


def test_empty_data_and_bad_policy_are_refused():
    torch.manual_seed(0)
    a, b = mlp(), mlp()
    with pytest.raises(ValueError, match="data set is empty"):
        mlifast.evaluate(a, mlifast.Line(a, b), [], coords=3, progress=False)
    with pytest.raises(ValueError, match="bn must be one of"):
        mlifast.evaluate(a, mlifast.Line(a, b), batches(), bn="train", progress=False)


@pytest.mark.parametrize("bn", ["interpolate", "recompute", "batch"])
def test_an_empty_batch_changes_nothing(bn):
    """A batch of no examples adds nothing: not to the means, nor, under "recompute", a
    batch to each statistic's equal-weight average (update_bn would count it)."""
    a, b = resnet_pair()
    data = batches(n=14, batch=4, shape=(3, 8, 8))
    with_empty = data[:2] + [(data[0][0][:0], data[0][1][:0])] + data[2:]
    line = mlifast.Line(a, b)
    expected = mlifast.evaluate(a, line, data, coords=3, bn=bn, progress=False)
    got = mlifast.evaluate(a, line, with_empty, coords=3, bn=bn, progress=False)
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=0, atol=0)
    assert got.meta["examples"] == 14


def test_interpolated_model_on_an_empty_batch_gives_each_point_an_empty_output():
    torch.manual_seed(0)
    factory = lambda: torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.ReLU(),  # noqa: E731
                                          torch.nn.Flatten(), torch.nn.Linear(128 * 16, 3))
    a, b = factory(), factory()
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]))
    with torch.no_grad():
        assert fast(torch.randn(0, 128, 4, 4)).shape == (3, 0, 3)
        assert fast(torch.randn(2, 128, 4, 4)).shape == (3, 2, 3)


def test_sequence_first_language_model_takes_batch_first_loss():
    """batch_dim=1: a (T, B) token batch and target, (T, B, V) logits; the loss takes
    (K·B, T, V) and (K·B, T) and returns one value per sequence."""
    from models import LSTMLanguageModel

    torch.manual_seed(0)
    a, b = LSTMLanguageModel(batch_first=False).double(), LSTMLanguageModel(batch_first=False).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 11, (7, n), generator=g), torch.randint(0, 11, (7, n), generator=g)) for n in (3, 2)]

    def per_sequence(logits, tokens):  # batch-first
        return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1)

    line = mlifast.Line(a, b)
    res = mlifast.evaluate(a, line, data, coords=4, loss=per_sequence, metrics=(), batch_dim=1, progress=False)
    expected = []
    for alpha in res.alphas.tolist():
        m = load_point(a, line, alpha)
        with torch.no_grad():
            expected.append(sum(per_sequence(m(x).transpose(0, 1), y.t()).sum().item() for x, y in data) / 5)
    torch.testing.assert_close(res["loss"], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)
    assert res.meta["examples"] == 5


class LastStepClassifier(torch.nn.Module):
    """Sequence-first tokens (T, B) → LSTM → its last step's (B, C) logits."""

    def __init__(self, classes):
        super().__init__()
        self.embed, self.rnn = torch.nn.Embedding(11, 6), torch.nn.LSTM(6, 6)
        self.head = torch.nn.Linear(6, classes)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0][-1])


@pytest.mark.parametrize("classes", [3, 4])
def test_sequence_first_classifier_keeps_its_batch_first_outputs(classes):
    """batch_dim=1 with (B, C) outputs and (B,) labels: nothing moved (4 classes: as many
    as examples, where guessing the batch's dimension by size would transpose them)."""
    torch.manual_seed(0)
    a, b = LastStepClassifier(classes).double(), LastStepClassifier(classes).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 11, (7, 4), generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(2)]
    line = mlifast.Line(a, b)
    res = mlifast.evaluate(a, line, data, coords=3, batch_dim=1, progress=False)
    losses, accs = loop_evaluate(a, line, data, res.alphas.tolist(), "interpolate")
    torch.testing.assert_close(res["loss"], losses, rtol=1e-9, atol=0)
    torch.testing.assert_close(res["accuracy"], accs, rtol=0, atol=1e-12)


def test_an_empty_first_batch_does_not_size_the_groups(monkeypatch):
    from mlifast.engine import chunking

    monkeypatch.setattr(chunking, "memory_budget", lambda device: 1 << 30)  # (not the free memory of the moment)
    a, b = resnet_pair()
    data = batches(n=8, batch=4, shape=(3, 8, 8))
    fast = mlifast.MultiPointModel(a, mlifast.Line(a, b), torch.zeros(3, 1))
    forward = lambda model, batch: (model(batch[0]), batch[1])  # noqa: E731
    assert chunking.plan(fast, [(data[0][0][:0], data[0][1][:0])] + data, forward, torch.device("cpu")) == \
        chunking.plan(fast, data, forward, torch.device("cpu"))


def test_user_model_is_untouched():
    a, b = resnet_pair()
    before = copy.deepcopy(a.state_dict())
    mlifast.evaluate(a, mlifast.Line(a, b), batches(n=8, batch=4, shape=(3, 8, 8)), coords=3, bn="recompute",
                     progress=False)
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    assert not a.training


def test_batch_norm_without_affine_or_running_stats():
    def net():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8),
                                   torch.nn.BatchNorm1d(8, affine=False), torch.nn.ReLU(),
                                   torch.nn.BatchNorm1d(8, track_running_stats=False), torch.nn.Linear(8, 5)).double()

    torch.manual_seed(0)
    a, b = net().eval(), net().eval()
    line = mlifast.Line(a, b)
    data = batches()
    for bn in ("recompute", "batch"):
        res = mlifast.evaluate(a, line, data, coords=3, bn=bn, progress=False)
        losses, _ = loop_evaluate(a, line, data, res.alphas.tolist(), bn)
        torch.testing.assert_close(res["loss"], losses, rtol=1e-9, atol=0)


def test_float32_model_evaluated_in_float64():
    torch.manual_seed(0)
    a, b = mlp().eval(), mlp().eval()
    data = [(x.float(), y) for x, y in batches()]
    line = mlifast.Line(a, b)
    res = mlifast.evaluate(a, line, data, coords=3, dtype=torch.float64, progress=False)
    losses, _ = loop_evaluate(a.double(), line.to(dtype=torch.float64), batches(), res.alphas.tolist(), "interpolate")
    torch.testing.assert_close(res["loss"], losses, rtol=1e-9, atol=0)


def test_memory_budget_sets_the_points_per_pass(monkeypatch):
    """On the CPU a pass holds one group's activations and each of its points' outputs:
    a budget of one point's activations plus two points' outputs takes 2 points a pass."""
    from mlifast.engine import chunking

    torch.manual_seed(0)
    a, b = mlp().double().eval(), mlp().double().eval()
    line, data = mlifast.Line(a, b), batches()
    point = chunking.bytes_per_point(mlifast.MultiPointModel(a, line, 1), data[0],
                                     lambda m, batch: (m(batch[0]), batch[1]), torch.device("cpu"))
    passes = []
    original = mlifast.MultiPointModel.set_coords
    monkeypatch.setattr(mlifast.MultiPointModel, "set_coords",
                        lambda self, c: passes.append(len(c)) or original(self, c))
    monkeypatch.setattr(chunking, "CPU_GROUP_BYTES", point.activations)
    monkeypatch.setattr(chunking, "weight_bytes", lambda space: 0)
    monkeypatch.setattr(chunking, "memory_budget", lambda device: point.activations + 2 * point.kept)
    res = mlifast.evaluate(a, line, data, coords=5, progress=False)
    assert passes[-3:] == [2, 2, 1]  # 5 points, 2 per pass
    losses, _ = loop_evaluate(a, line, data, res.alphas.tolist(), "interpolate")
    torch.testing.assert_close(res["loss"], losses, rtol=1e-9, atol=0)


class TokenClassifier(torch.nn.Module):  # (B, T, 4) tokens -> (B, 5, T) logits, class dim 1 as cross entropy takes
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(x).transpose(1, 2)


@pytest.mark.parametrize("ignore_index", [None, 0])
def test_ignored_targets_are_left_out_of_the_loss_and_accuracy(ignore_index):
    """Targets equal to cross entropy's ignore_index (padding, masked labels) count neither
    as a loss of 0 nor as a miss: the loss is cross entropy's own mean over the targets it
    counts, over the whole data set, at every point."""
    torch.manual_seed(0)
    a, b = TokenClassifier().double(), TokenClassifier().double()
    line, skip = mlifast.Line(a, b), -100 if ignore_index is None else ignore_index
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=g)
    y = torch.randint(1, 5, (5, 3), generator=g)
    y[0, 1:], y[2, :], y[4, 0] = skip, skip, skip  # (one example with no target counted at all)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    loss = None if ignore_index is None else functools.partial(F.cross_entropy, ignore_index=ignore_index)
    res = mlifast.evaluate(a, line, data, coords=4, loss=loss, metrics="accuracy", progress=False)
    counted = y != skip
    for k, alpha in enumerate(res.alphas.tolist()):
        logits = load_point(a, line, alpha)(x)
        expected = F.cross_entropy(logits, y, ignore_index=skip)
        assert math.isclose(res["loss"][k].item(), expected.item(), rel_tol=1e-12)
        hits = (logits.argmax(1) == y)[counted].double().mean() if ignore_index is None else \
            (logits.argmax(1) == y).double().mean()  # (accuracy skips -100 only)
        assert math.isclose(res["accuracy"][k].item(), hits.item(), rel_tol=1e-12)


def test_a_data_set_of_ignored_targets_alone_is_refused():
    torch.manual_seed(0)
    a, b = TokenClassifier(), TokenClassifier()
    data = [(torch.randn(2, 3, 4), torch.full((2, 3), -100))]
    with pytest.raises(ValueError, match="every target of the data set is one that loss and accuracy skip"):
        mlifast.evaluate(a, mlifast.Line(a, b), data, coords=2, metrics="accuracy", progress=False)
