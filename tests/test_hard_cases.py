"""Models that do things per batch the fused rules do not follow: the answer is still the
oracle's (fused where possible, else one point at a time with a warning), never silently
wrong, and neither the caller's tensors nor the space change."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import mlifast
from oracle import oracle_outputs, rel_err


def answer(model, line, coords, *args):
    """(multi-point output, whether it fell back to one point at a time)."""
    fast = mlifast.interpolate(model, line, coords)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(*args)
    fell_back = any("one point at a time" in str(w.message) for w in caught)
    assert fell_back == fast.per_point_fallback
    return out, fell_back


def check(model_factory, *args, coords=(0.0, 1.0), expect_fallback=None):
    torch.manual_seed(0)
    a, b = model_factory(), model_factory()
    line, coords = mlifast.Line(a, b), torch.tensor(coords)
    out, fell_back = answer(a, line, coords, *args)
    for k, e in enumerate(oracle_outputs(a, line, coords, *args)):
        assert rel_err(out[k], e) < 1e-5, k
    if expect_fallback is not None:
        assert fell_back == expect_fallback
    return a, line


class PositionIds(nn.Module):  # nanoGPT: position ids (T,) with T a multiple of K·B
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(11, 4), nn.Embedding(16, 4), nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))


class ClampInputs(nn.Module):  # writes into its input
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x[x < 0] = 0
        return self.fc(x)


class Prompt(nn.Module):  # a module with moving parameters called without a batch input
    def __init__(self):
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(3, 4))

    def forward(self):
        return torch.tanh(self.ctx)


class PromptModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.prompt = nn.Linear(5, 4), Prompt()

    def forward(self, x):
        return self.enc(x) @ self.prompt().t()


def softplus_bias():
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    parametrize.register_parametrization(m[0], "bias", nn.Softplus())
    return m


def hooked():
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    m[0].register_forward_hook(lambda mod, i, o: o * 2 + 1)
    return m


@pytest.mark.parametrize("tokens", [8, 4], ids=["twice", "exactly"])
def test_position_ids_whose_length_is_a_multiple_of_the_rows(tokens):
    """nanoGPT's torch.arange(T) at 2 points × 2 sequences: T = 8 or 4 could be rows, but
    they are the same for every example; the check finds it and the points stay fused,
    at later batch sizes too. It takes two passes at the first shape: indices as rows, then
    shared (not inputs repeated in between)."""
    torch.manual_seed(0)
    a = PositionIds()
    line, coords = mlifast.Line(a, PositionIds()), torch.tensor([0.0, 1.0])
    fast = mlifast.interpolate(a, line, coords)
    passes, run = [], fast._run
    fast._run = lambda *args, **kw: passes.append(1) or run(*args, **kw)
    for batch in (2, 4, 3):
        x = torch.randint(0, 11, (batch, tokens))
        out = fast(x)
        assert not fast.per_point_fallback, batch
        if batch == 2:
            assert len(passes) == 2
        for k, e in enumerate(oracle_outputs(a, line, coords, x)):
            assert rel_err(out[k], e) < 1e-5, (batch, k)


class PositionsWhenSequences(nn.Module):
    """Position ids for sequences (B, T); 1-d indices (B,) are labels. Flattens each
    example's outputs with a captured batch size: shared rows disagree, inputs repeat."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(11, 4), nn.Embedding(16, 4), nn.Linear(4, 3)

    def forward(self, idx):
        h = self.tok(idx)
        if idx.dim() == 2:
            h = h + self.pos(torch.arange(idx.shape[1]))
        return self.head(h).reshape(idx.shape[0], -1)


def square_loss(out, target):
    return out.pow(2).mean(1)


def loop_losses(model, line, coords, x):
    return torch.stack([square_loss(out, None).mean() for out in oracle_outputs(model, line, coords, x)]).double()


@pytest.fixture
def readings_tried(monkeypatch):
    """Per reading the first-call checks try: whether 1-d indices were the same for every
    example (PointContext.flat_indices_shared)."""
    from mlifast.multipoint import MultiPointModel
    tried, readings = [], MultiPointModel._readings

    def recorded(self):
        for share in readings(self):
            tried.append((share, self.context.flat_indices_shared))
            yield share

    monkeypatch.setattr(MultiPointModel, "_readings", recorded)
    return tried


def evaluate_without_fallback(model, line, coords, *batches):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a fallback warns)
        res = mlifast.evaluate(model, line, [(x, torch.zeros(len(x))) for x in batches], coords=coords,
                               loss=square_loss, metrics=(), progress=False)
    expected = sum(loop_losses(model, line, coords, x) * len(x) for x in batches) / sum(len(x) for x in batches)
    assert rel_err(res["loss"], expected) < 1e-5


def test_a_later_evaluate_of_the_same_model_tries_the_indices_shared_first(readings_tried):
    """nanoGPT's position ids at 2 points × 2 sequences of 4 tokens (T = K·B), in a model
    that needs its inputs repeated: the first evaluate call reads them as rows, then shared;
    the next call of the same model tries them shared first, saving two passes."""
    torch.manual_seed(0)
    a = PositionsWhenSequences()
    line, coords = mlifast.Line(a, PositionsWhenSequences()), torch.tensor([0.0, 1.0])
    x = torch.randint(0, 11, (2, 4))
    evaluate_without_fallback(a, line, coords, x)
    assert readings_tried == [(True, False), (True, True), (False, False), (False, True)]
    evaluate_without_fallback(a, line, coords, x)
    assert readings_tried[4:] == [(True, True), (True, False), (False, True)]


def test_the_hint_orders_the_readings_and_never_rules_one_out(readings_tried):
    """After the hint (position ids shared), the same model on 1-d indices that are labels,
    one per example (repeated for the points: K·B of them): shared, they disagree; then
    read as rows, they agree. No fallback, also where a first batch of other sequences (T
    not a multiple of K·B) agreed with the hinted reading, which decided nothing there. A
    call that ends with the indices read as rows drops the hint."""
    torch.manual_seed(0)
    a = PositionsWhenSequences()
    line, coords = mlifast.Line(a, PositionsWhenSequences()), torch.tensor([0.0, 1.0])
    evaluate_without_fallback(a, line, coords, torch.randint(0, 11, (2, 4)))
    evaluate_without_fallback(a, line, coords, torch.randint(0, 11, (4,)))
    assert readings_tried[4:] == [(True, True), (True, False), (False, True), (False, False)]
    evaluate_without_fallback(a, line, coords, torch.randint(0, 11, (2, 4)))  # (the hint again)
    del readings_tried[:]
    evaluate_without_fallback(a, line, coords, torch.randint(0, 11, (2, 3)), torch.randint(0, 11, (4,)))
    assert readings_tried[-2:] == [(False, True), (False, False)]
    del readings_tried[:]
    evaluate_without_fallback(a, line, coords, torch.randint(0, 11, (4,)))
    assert readings_tried == [(True, False), (False, False)]


def test_label_embeddings_of_one_dimension_stay_per_example():
    """A 1-D index tensor that does carry one row per example (class labels) is read as
    rows: no retry turns it into a shared one."""
    class Labels(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(5, 4), nn.Linear(4, 2)

        def forward(self, y):
            return self.head(self.emb(y))

    check(Labels, torch.tensor([0, 3, 4, 1]), expect_fallback=False)


def test_model_writing_into_its_inputs():
    x = torch.rand(3, 4)
    _, line = check(ClampInputs, x)
    fast = mlifast.interpolate(ClampInputs(), line, torch.tensor([0.0, 1.0]))
    fast(torch.rand(3, 4))  # no negatives: the first call cannot tell
    x = torch.randn(3, 4)
    x_before = x.clone()
    out = fast(x)
    assert torch.equal(x, x_before)  # the caller's tensor is untouched
    for k, e in enumerate(oracle_outputs(ClampInputs(), line, torch.tensor([0.0, 1.0]), x.clone())):
        assert rel_err(out[k], e) < 1e-5


def test_in_place_activation_leaves_the_callers_input_alone():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.LeakyReLU(0.1, inplace=True), nn.Linear(4, 3)) for _ in range(2))
    line, coords, x = mlifast.Line(a, b), torch.tensor([0.0, 1.0]), torch.randn(3, 4)
    x_before = x.clone()
    out, fell_back = answer(a, line, coords, x)
    assert torch.equal(x, x_before) and not fell_back
    for k, e in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], e) < 1e-6


@pytest.mark.parametrize("factory", [PromptModel, hooked], ids=["no-batch-input", "forward-hook"])
def test_unfollowed_models_fall_back_to_one_point_at_a_time(factory):
    check(factory, torch.randn(6, 5 if factory is PromptModel else 4), expect_fallback=True)


def weight_norm_linear():
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2))


def spectral_norm_conv():  # (eval mode: its power iteration's vectors stay as they are)
    conv = nn.utils.parametrizations.spectral_norm(nn.Conv1d(4, 3, 1))
    return nn.Sequential(conv, nn.Flatten(), nn.Linear(3, 2)).eval()


def parametrized_attention():  # (its rule owns its out_proj's tensors too: its forward reads them)
    class Attends(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            parametrize.register_parametrization(self.attn, "in_proj_bias", nn.Tanh())

        def forward(self, x):
            return self.attn(x, x, x)[0]
    return Attends()


@pytest.mark.parametrize("factory", [softplus_bias, weight_norm_linear, spectral_norm_conv, parametrized_attention],
                         ids=["softplus-bias", "weight-norm", "spectral-norm-conv", "attention"])
def test_weights_computed_before_use_are_each_points(factory):
    """Parametrized modules run their own forward at each point's tensors (the
    parametrization's included): no fused rule, no fallback of the whole model."""
    shapes = {spectral_norm_conv: (6, 4, 1), parametrized_attention: (6, 3, 4)}
    x = torch.randn(*shapes.get(factory, (6, 4)))
    check(factory, x, coords=(0.0, 0.4, 1.0), expect_fallback=False)


def test_fallback_results_flow_through_evaluate():
    torch.manual_seed(0)
    a, b = PromptModel(), PromptModel()
    line = mlifast.Line(a, b)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="one point at a time"):
        res = mlifast.evaluate(a, line, [(x, y)], coords=[0.0, 1.0], metrics=(), progress=False)
    expected = [F.cross_entropy(o, y).item() for o in oracle_outputs(a, line, torch.tensor([0.0, 1.0]), x)]
    torch.testing.assert_close(res["loss"], torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_generic_batch_norm_subclass_in_train_mode_leaves_the_space_alone():
    class MyBN(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 4), MyBN(4)), nn.Sequential(nn.Linear(4, 4), MyBN(4))
    a.train()
    line = mlifast.Line(a, b)
    before = line.origin["1.running_mean"].clone()
    mlifast.interpolate(a, line, torch.tensor([0.0, 1.0]))(torch.randn(5, 4))
    assert torch.equal(before, line.origin["1.running_mean"])


@pytest.mark.parametrize("make, attention", [
    (lambda: nn.MultiheadAttention(8, 2, batch_first=True), lambda m: m),
    (lambda: nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True), lambda m: m.self_attn),
], ids=["MultiheadAttention", "TransformerEncoderLayer"])
def test_an_attention_whose_out_projection_alone_moves(make, attention):
    torch.manual_seed(0)
    a, b = make().double().eval(), make().double().eval()
    with torch.no_grad():  # (fine-tuned with the in-projection frozen)
        attention(b).in_proj_weight.copy_(attention(a).in_proj_weight)
        attention(b).in_proj_bias.copy_(attention(a).in_proj_bias)
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.3, 1.0])
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    args = (x, x, x) if isinstance(a, nn.MultiheadAttention) else (x,)
    out, fell_back = answer(a, line, coords, *args)
    assert not fell_back
    for k, expected in enumerate(oracle_outputs(a, line, coords, *args)):
        first = (lambda o: o[0] if isinstance(o, tuple) else o)
        assert rel_err(first(out)[k], first(expected)) < 1e-12, k


class PacksItsSequences(nn.Module):  # (variable-length sequences packed inside forward)
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(10, 4), nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, tokens, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        return self.fc(self.rnn(packed)[1][0][-1])


def test_sequences_packed_inside_forward_are_refused_saying_what_to_change():
    torch.manual_seed(0)
    a, b = PacksItsSequences(), PacksItsSequences()
    data = [(torch.randint(1, 10, (4, 6)), torch.tensor([6, 3, 5, 2]))]
    with pytest.raises(TypeError, match=r"'rnn' got a PackedSequence.*run it on the padded batch"):
        mlifast.interpolate(a, mlifast.Line(a, b), 3)(*data[0])
    with pytest.raises(TypeError, match=r"'rnn' got a PackedSequence.*run it on the padded batch"):
        mlifast.evaluate(a, mlifast.Line(a, b), [{"tokens": x, "lengths": n, "y": torch.zeros(4, dtype=torch.long)}
                                                 for x, n in data], coords=3, progress=False)


class PaddedEncoder(nn.Module):  # (mean over every position, padded ones too)
    def __init__(self, batch_first, final_norm=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8) if final_norm else None)
        self.head, self.batch_first = nn.Linear(8, 3), batch_first

    def forward(self, x, padding):
        h = self.enc(x if self.batch_first else x.transpose(0, 1), src_key_padding_mask=padding)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first, final_norm", [(True, False), (False, False), (True, True)])
def test_an_encoder_gives_zeros_at_padded_positions_as_pytorchs_nested_path(batch_first, final_norm):
    # (without autograd PyTorch runs a padded batch as a nested tensor, zeros where padded;
    # mlifast followed its layer-by-layer path, silently, once a first batch had no padding)
    import warnings as w
    w.filterwarnings("ignore", message=".*nested tensors is in prototype.*")
    torch.manual_seed(0)
    a, b = (PaddedEncoder(batch_first, final_norm).double().eval() for _ in range(2))
    norms = [m for m in b.modules() if isinstance(m, nn.LayerNorm)]
    with torch.no_grad():
        for m in norms:  # (a final norm's output of 0 is its bias)
            m.bias.normal_()
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    none, some = torch.zeros(4, 5, dtype=torch.bool), torch.tensor([[0] * 5, [0, 0, 0, 1, 1]] * 2, dtype=torch.bool)
    frozen = copy.deepcopy(a).requires_grad_(False)  # (with autograd, a model of no trainable parameter)
    for model, grad in ((a, False), (frozen, True), (a, True)):
        fast = mlifast.interpolate(model, line, coords)
        with torch.set_grad_enabled(grad):
            for padding in (none, some, none, some):
                out = fast(x, padding)
                for k, c in enumerate(coords.tolist()):
                    point = copy.deepcopy(model)
                    point.load_state_dict(line.state_at(c))
                    assert rel_err(out[k], point(x, padding)) < 1e-12, (grad, padding.any().item(), k)
        assert not fast.per_point_fallback


class WritesIntoItsWeight(nn.Module):  # a constraint applied in forward
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            self.fc2.weight.clamp_(-0.2, 0.2)
        return self.fc2(self.fc1(x))


def test_a_forward_writing_into_its_parameters_is_refused_naming_them():
    torch.manual_seed(0)
    a, b = WritesIntoItsWeight(), WritesIntoItsWeight()
    b.fc2.load_state_dict(a.fc2.state_dict())  # frozen: the copy reads the space's own tensor
    with pytest.raises(RuntimeError, match=r"wrote into 'fc2.weight' during its forward"):
        mlifast.interpolate(a, mlifast.Line(a, b), 3)(torch.randn(5, 4))
    with torch.no_grad():
        b.fc2.weight.add_(1.0)  # moving: refused where it is used
    with pytest.raises(mlifast.UnhandledParameterError, match="'fc2.weight'"):
        mlifast.interpolate(a, mlifast.Line(a, b), 3)(torch.randn(5, 4))


def test_one_shot_iterators_are_refused():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    with pytest.raises(TypeError, match="one-shot iterator"):
        mlifast.evaluate(a, mlifast.Line(a, b), (batch for batch in batches), coords=3, progress=False)


def test_tied_keys_that_differ_in_the_space_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    a, b = Tied(), Tied()
    end = {k: v.clone() for k, v in b.state_dict().items()}
    end["b.weight"] += 1
    with pytest.raises(ValueError, match="'b.weight' and 'a.weight' are one tied tensor"):
        mlifast.interpolate(a, mlifast.Line(a.state_dict(), end), 2)


def test_a_parametrized_batch_norm_is_refused():
    def model():
        m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        parametrize.register_parametrization(m[1], "weight", nn.Softplus())
        return m
    a, b = model(), model()
    with pytest.raises(NotImplementedError, match="batch norm '1' computes its weight"):
        mlifast.interpolate(a, mlifast.Line(a, b), 3)


def test_fallback_refuses_batch_norm_policies_it_cannot_follow():
    class PromptBN(nn.Module):  # (a module with moving parameters called without a batch input)
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.prompt = nn.Linear(4, 4), nn.BatchNorm1d(4), Prompt()

        def forward(self, x):
            return self.bn(self.fc(x)) @ self.prompt().t()

    torch.manual_seed(0)
    a, b = PromptBN().eval(), PromptBN().eval()
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    for bn in ("recompute", "batch"):
        with pytest.warns(RuntimeWarning, match="one point at a time"), \
                pytest.raises(NotImplementedError, match="supports only bn='interpolate'"):
            mlifast.evaluate(a, mlifast.Line(a, b), data, coords=2, bn=bn, progress=False)


def old_weight_norm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated)
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2))


def test_deprecated_weight_norm_runs_its_hook_at_each_point_or_is_refused_clearly():
    with torch.no_grad():  # (its weight then a leaf, which copies)
        check(old_weight_norm, torch.randn(6, 4), coords=(0.0, 0.4, 1.0), expect_fallback=False)
    a, b = old_weight_norm(), old_weight_norm()  # (its weight computed with autograd: no copy can hold it)
    with pytest.raises(TypeError, match=r"Linear\.weight is a tensor computed with autograd.*parametrizations"):
        mlifast.interpolate(a, mlifast.Line(a, b), 3)
