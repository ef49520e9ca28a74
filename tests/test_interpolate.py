"""interpolate(model, space, coords)(x)[k] == the model loaded with space.state_at(coords[k])."""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlifast
from mlifast.multipoint.rule import MultiPointRule
from models import (CapturesBatch, LayerScaleBlock, LSTMLanguageModel, ReadsChildWeight, ResNet20, mlp,
                    randomize_bn, vgg_like)
from oracle import TOL, oracle_outputs, rel_err


def pair(factory, dtype, seed=0):
    torch.manual_seed(seed)
    a = randomize_bn(factory(), seed).to(dtype).eval()
    torch.manual_seed(seed + 1)
    b = randomize_bn(factory(), seed + 1).to(dtype).eval()
    return a, b


def check_parity(model, space, coords, *args, dtype):
    fast = mlifast.interpolate(model, space, coords)
    out = fast(*args)
    expected = oracle_outputs(model, space, coords, *args)
    assert out.shape == (len(coords), *expected[0].shape)
    for k, e in enumerate(expected):
        assert rel_err(out[k], e) < TOL[dtype], (k, rel_err(out[k], e))
    return fast


CASES = {
    "mlp": (mlp, lambda g: torch.randn(7, 3, 4, generator=g)),
    "resnet20": (ResNet20, lambda g: torch.randn(3, 3, 16, 16, generator=g)),
    "vgg": (vgg_like, lambda g: torch.randn(4, 3, 16, 16, generator=g)),
    "layerscale": (LayerScaleBlock, lambda g: torch.randn(3, 5, 8, generator=g)),
    "lstm": (LSTMLanguageModel, lambda g: torch.randint(0, 11, (3, 7), generator=g)),
    "lstm_seq_first": (lambda: LSTMLanguageModel(batch_first=False), None),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][1] is not None])
def test_line_parity(name, dtype):
    factory, make_input = CASES[name]
    a, b = pair(factory, dtype)
    x = make_input(torch.Generator().manual_seed(3))
    x = x.to(dtype) if x.is_floating_point() else x
    check_parity(a, mlifast.Line(a, b), torch.linspace(-0.25, 1.25, 5), x, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["mlp", "resnet20", "layerscale"])
def test_plane_parity(name, dtype):
    factory, make_input = CASES[name]
    a, b = pair(factory, dtype)
    _, c = pair(factory, dtype, seed=7)
    x = make_input(torch.Generator().manual_seed(4)).to(dtype)
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, -0.4], [1.2, 0.5]], dtype=torch.float64)
    check_parity(a, mlifast.Plane.through(a, b, c), coords, x, dtype=dtype)


@pytest.mark.parametrize("k", [1, 64])
def test_many_and_single_points(k):
    a, b = pair(mlp, torch.float64)
    check_parity(a, mlifast.Line(a, b), torch.linspace(0, 1, k), torch.randn(5, 3, 4, dtype=torch.float64),
                 dtype=torch.float64)


class OwnStateDict(nn.Module):
    """A model whose state_dict takes no keep_vars (an older or custom signature)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)

    def state_dict(self, destination=None, prefix=""):
        return super().state_dict(destination=destination, prefix=prefix)


def test_model_with_its_own_state_dict_signature():
    torch.manual_seed(0)
    a, b = OwnStateDict().double(), OwnStateDict().double()
    check_parity(a, mlifast.Line(a, b), torch.linspace(0, 1, 3), torch.randn(4, 3, dtype=torch.float64),
                 dtype=torch.float64)


def test_sequence_first_lstm():
    a, b = pair(lambda: LSTMLanguageModel(batch_first=False), torch.float64)
    tokens = torch.randint(0, 11, (7, 3))  # (T, B)
    line = mlifast.Line(a, b)
    out = mlifast.interpolate(a, line, torch.tensor([0.0, 0.4, 1.0]), batch_dim=1)(tokens)
    for k, e in enumerate(oracle_outputs(a, line, torch.tensor([0.0, 0.4, 1.0]), tokens)):
        assert rel_err(out[k], e) < 1e-9


def test_train_mode_batch_norm_uses_each_points_batch_statistics_and_leaves_model_untouched():
    a, b = pair(ResNet20, torch.float64)
    a.train()
    before = copy.deepcopy(a.state_dict())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    coords = torch.tensor([0.0, 0.5, 1.0])
    line = mlifast.Line(a, b)
    out = mlifast.interpolate(a, line, coords)(x)
    for k, e in enumerate(oracle_outputs(a, line, coords, x)):  # each oracle copy updates its own stats
        assert rel_err(out[k], e) < 1e-9
    for key, value in a.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_frozen_layers_are_not_wrapped():
    a, b = pair(mlp, torch.float64)
    b[1].load_state_dict(a[1].state_dict())  # first layer frozen along the line
    fast = check_parity(a, mlifast.Line(a, b), torch.linspace(0, 1, 3), torch.randn(2, 3, 4, dtype=torch.float64),
                        dtype=torch.float64)
    assert isinstance(fast.model[1], nn.Linear) and not isinstance(fast.model[1], MultiPointRule)
    assert isinstance(fast.model[4], MultiPointRule)


@pytest.mark.parametrize("through_data", [False, True])
def test_parameter_read_outside_its_module_raises_naming_it(through_data):
    torch.manual_seed(0)
    a, b = ReadsChildWeight(through_data), ReadsChildWeight(through_data)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), 3)
    with pytest.raises(mlifast.UnhandledParameterError, match=r"'child\.weight' \(Linear\)"):
        fast(torch.randn(2, 4))


class GRUHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gru(x)[0])


def conv_bn_head():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 25, 3)).eval()


@pytest.mark.parametrize("factory, shape", [(mlp, (4, 3, 4)), (conv_bn_head, (2, 3, 5, 5)), (GRUHead, (2, 5, 3))],
                         ids=["mlp", "conv-bn", "gru"])
def test_forward_mode_and_torch_func_derivatives_match_the_oracle(factory, shape):
    # (the compiled ops have reverse-mode derivatives at most: a forward tangent through them was lost)
    torch.manual_seed(0)
    a, b = factory().double().eval(), factory().double().eval()
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.3, 1.0])
    x, t = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    fast = mlifast.interpolate(a, line, coords)
    fast(x)  # (an ordinary call first)

    def oracle(u):
        return torch.stack(oracle_outputs(a, line, coords, u))
    _, tangent = torch.func.jvp(fast, (x,), (t,))
    assert rel_err(tangent, torch.func.jvp(oracle, (x,), (t,))[1]) < 1e-12
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.unpack_dual(fast(torch.autograd.forward_ad.make_dual(x, t))).tangent
    assert dual is not None and rel_err(dual, tangent) < 1e-12
    grad = torch.func.grad(lambda u: fast(u).sin().sum())(x)
    assert rel_err(grad, torch.func.grad(lambda u: oracle(u).sin().sum())(x)) < 1e-12


def test_new_tensors_made_like_a_parameter_are_fine():
    class InitialState(nn.Module):  # the word language model's init_hidden idiom
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            weight = next(self.parameters())
            h0 = weight.data.new(1, x.shape[0], 4).zero_() + weight.new_zeros(()) + torch.zeros_like(weight)[0, 0]
            return self.head(self.rnn(x, h0)[0])

    torch.manual_seed(0)
    a, b = InitialState().double(), InitialState().double()
    line, coords, x = mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), torch.randn(2, 5, 3, dtype=torch.float64)
    out = mlifast.interpolate(a, line, coords)(x)
    for k, e in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], e) < 1e-9, k


def test_parameter_read_outside_is_fine_when_frozen():
    torch.manual_seed(0)
    a = ReadsChildWeight()
    b = copy.deepcopy(a)
    b.child.bias.data += 1  # only the bias moves
    check_parity(a, mlifast.Line(a, b), torch.linspace(0, 1, 3), torch.randn(2, 4), dtype=torch.float32)


@dataclasses.dataclass
class Logits:
    logits: torch.Tensor
    extra: object = None


class CapturesBatchInADataclass(CapturesBatch):
    def forward(self, x):
        return Logits(super().forward(x))


def test_a_dataclass_output_is_split_and_checked():
    # (the check must see its tensors: on shared rows this model's points trade rows)
    torch.manual_seed(0)
    a, b = CapturesBatchInADataclass().double(), CapturesBatchInADataclass().double()
    line, coords, x = mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), torch.randn(4, 4, dtype=torch.float64)
    out = mlifast.interpolate(a, line, coords)(x)
    assert type(out) is Logits and out.logits.shape == (3, 4, 2)
    for k, e in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out.logits[k], e.logits) < 1e-9, k


def test_a_module_without_a_rule_may_return_a_dataclass():
    class Projects(nn.Module):  # (a matmul with its own weight: run once per point)
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return Logits(torch.tanh(x @ self.w))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.fc = Projects(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.proj(x).logits)

    torch.manual_seed(0)
    a, b = Net().double(), Net().double()
    line, coords, x = mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), torch.randn(3, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no fallback: the module's points are put together)
        out = mlifast.interpolate(a, line, coords)(x)
    for k, e in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], e) < 1e-9, k


def test_an_output_whose_tensors_it_cannot_read_is_refused():
    class Holder:
        def __init__(self, t):
            self.values = [t]

    class Hides(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return Holder(self.fc(x))

    a, b = Hides(), Hides()
    with pytest.raises(TypeError, match=r"inside output \(Holder\), which mlifast cannot read"):
        mlifast.interpolate(a, mlifast.Line(a, b), 3)(torch.randn(2, 4))


def test_output_that_mixes_points_is_refused():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.fc(x), "loss": self.fc(x).pow(2).mean()}

    a, b = WithLoss(), WithLoss()
    with pytest.raises(mlifast.NotPerExampleOutputError, match=r"output\['loss'\] has shape \(\)"):
        mlifast.interpolate(a, mlifast.Line(a, b), 3)(torch.randn(4, 3))


def test_a_first_argument_not_batched_is_named_in_the_refusal():
    torch.manual_seed(0)
    a, b = nn.EmbeddingBag(10, 4), nn.EmbeddingBag(10, 4)  # (flat indices first, then each bag's offset)
    with pytest.raises(mlifast.NotPerExampleOutputError, match=r"The 7 examples are the size of the first tensor "
                                                              r"argument along dim 0.*EmbeddingBag"):
        mlifast.interpolate(a, mlifast.Line(a, b), 3)(torch.randint(0, 10, (7,)), torch.tensor([0, 2, 5]))


def test_dict_outputs_and_extra_batch_inputs():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, mask=None):
            return {"logits": self.fc(x) * mask.unsqueeze(-1), "hidden": (x.sum(-1),)}

    a, b = Masked().double(), Masked().double()
    line = mlifast.Line(a, b)
    x, mask = torch.randn(4, 5, 3, dtype=torch.float64), (torch.rand(4, 5) > 0.5).double()
    out = mlifast.interpolate(a, line, torch.tensor([0.0, 0.7]))(x, mask=mask)
    for k, e in enumerate(oracle_outputs(a, line, torch.tensor([0.0, 0.7]), x, mask=mask)):
        assert rel_err(out["logits"][k], e["logits"]) < 1e-12
        assert torch.equal(out["hidden"][0][k], e["hidden"][0])


def test_model_and_space_mismatch_is_explained():
    a = mlp()
    other = nn.Sequential(nn.Flatten(), nn.Linear(12, 16))
    with pytest.raises(ValueError, match="keys only in the space"):
        mlifast.interpolate(other, mlifast.Line(a, mlp()), 3)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_transformer_encoder_with_padding_mask(batch_first, dtype):
    from models import TransformerClassifier

    a, b = pair(lambda: TransformerClassifier(batch_first=batch_first), dtype)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 13, (4, 6), generator=g)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[1, 4:] = padding[3, 2:] = True
    tokens[padding] = 0
    check_parity(a, mlifast.Line(a, b), torch.linspace(-0.2, 1.2, 4), tokens, padding, dtype=dtype)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_weights_and_masks(batch_first):
    torch.manual_seed(0)
    a = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=5, vdim=6).double().eval()
    b = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=5, vdim=6).double().eval()
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 7, 5), torch.randn(3, 7, 6)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    q, k, v = q.double(), k.double(), v.double()
    causal = torch.ones(4, 7, dtype=torch.bool).triu(1)
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.3, 1.0])
    out = mlifast.interpolate(a, line, coords, batch_dim=0 if batch_first else 1)(q, k, v, attn_mask=causal)
    for i, (o, w) in enumerate(oracle_outputs(a, line, coords, q, k, v, attn_mask=causal)):
        assert rel_err(out[0][i], o) < 1e-9 and rel_err(out[1][i], w) < 1e-9


def test_sequence_first_attention_weights_when_a_length_is_a_multiple_of_the_rows():
    # (weights (K·B, T, S), the batch not at batch_dim = 1, and S = 6 a multiple of K·B too)
    torch.manual_seed(0)
    a, b = (nn.MultiheadAttention(8, 2).double().eval() for _ in range(2))
    q, kv = torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(6, 2, 8, dtype=torch.float64)
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.3, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = mlifast.interpolate(a, line, coords, batch_dim=1)(q, kv, kv)
    for i, (o, w) in enumerate(oracle_outputs(a, line, coords, q, kv, kv)):
        assert rel_err(out[0][i], o) < 1e-9 and rel_err(out[1][i], w) < 1e-9


@pytest.mark.parametrize("masks", ["none", "causal", "bool", "float", "per_head", "padding", "padding+causal"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_without_weights_takes_the_fused_kernel(batch_first, masks, monkeypatch):
    torch.manual_seed(0)
    a, b = (nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval() for _ in range(2))
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    g = torch.Generator().manual_seed(1)
    kwargs = {"need_weights": False}
    if masks in ("causal", "padding+causal"):
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64), is_causal=True)
    if masks == "bool":
        kwargs["attn_mask"] = torch.rand(6, 6, generator=g) < 0.3
        kwargs["attn_mask"].fill_diagonal_(False)
    if masks == "float":
        kwargs["attn_mask"] = torch.randn(6, 6, generator=g, dtype=torch.float64)
    if masks == "per_head":  # (B·H, L, S)
        kwargs["attn_mask"] = torch.randn(3 * 2, 6, 6, generator=g, dtype=torch.float64)
    if masks.startswith("padding"):
        kwargs["key_padding_mask"] = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.3, 1.0])
    expected = oracle_outputs(a, line, coords, x, x, x, **kwargs)
    fused = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kw: fused.append(1) or sdpa(*args, **kw))
    out, weights = mlifast.interpolate(a, line, coords, batch_dim=0 if batch_first else 1)(x, x, x, **kwargs)
    assert weights is None and fused
    for i, (o, _) in enumerate(expected):
        assert rel_err(out[i], o) < 1e-9


class ViewFlat(nn.Module):
    """x.view(B, -1): what a classic CNN head does to a contiguous convolution output."""

    def forward(self, x):
        return x.view(x.shape[0], -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geometry", [dict(), dict(stride=2), dict(dilation=2, padding=2), dict(bias=False),
                                      dict(kernel_size=(1, 3), padding=(0, 1))])
def test_wide_convolutions_at_few_positions_as_products_of_patches(geometry, dtype, monkeypatch):
    """128 → 128 channels on 4 × 4 images: each point's patches through multipoint_linear."""
    from mlifast.multipoint import layers

    conv = dict(kernel_size=3, padding=1) | geometry
    factory = lambda: nn.Sequential(nn.Conv2d(128, 128, **conv), nn.BatchNorm2d(128), nn.ReLU(),  # noqa: E731
                                    nn.Conv2d(128, 128, 3, padding=1), ViewFlat(), nn.Linear(128 * 16, 3)
                                    if conv.get("stride", 1) == 1 else nn.LazyLinear(3))
    torch.manual_seed(0)
    x = torch.randn(2, 128, 4, 4, dtype=dtype)
    a, b = factory(), factory()
    a(x.float()), b(x.float())  # (a lazy layer takes its shape)
    a, b = randomize_bn(a, 0).to(dtype).eval(), randomize_bn(b, 1).to(dtype).eval()
    unfolded = []
    original = layers.ConvRule._by_unfolded_patches
    monkeypatch.setattr(layers.ConvRule, "_by_unfolded_patches",
                        lambda self, rows: unfolded.append(1) or original(self, rows))
    with torch.no_grad():
        check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.4, 1.0, 1.3]), x, dtype=dtype)
    assert unfolded


class GroupNormBlock(nn.Module):
    """conv → GroupNorm → activation, plus the input: a diffusion model's residual block."""

    def __init__(self, channels=8, groups=4, act=nn.SiLU, dims=2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.act = act()
        self.out = conv(channels, channels, 1)

    def forward(self, x):
        return self.out(self.act(self.norm(self.conv(x)))) + self.norm(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["silu", "relu", "bias alone moves", "channels-last", "one group",
                                  "a group a channel", "3-d", "mean 1000"])
def test_group_norm_by_channel_passes(case, dtype, monkeypatch):
    """Each example's group statistics and each point's affine in two passes, on every layout."""
    from mlifast.multipoint import layers

    block = dict(act=nn.ReLU if case == "relu" else nn.SiLU,
                 groups={"one group": 1, "a group a channel": 8}.get(case, 4), dims=3 if case == "3-d" else 2)
    a, b = pair(lambda: GroupNormBlock(**block), dtype)
    with torch.no_grad():  # (initialised to 1 and 0 at both ends: move them)
        b.norm.weight.add_(0 if case == "bias alone moves" else 0.5), b.norm.bias.sub_(0.25)
    x = torch.randn(3, 8, *((4, 5, 6) if case == "3-d" else (6, 7)), dtype=dtype)
    if case == "channels-last":
        a, b, x = (t.to(memory_format=torch.channels_last) for t in (a, b, x))
    if case == "mean 1000":
        x = x + 1000
    passes = []
    original = layers.GroupNormRule._pending_affine
    monkeypatch.setattr(layers.GroupNormRule, "_pending_affine",
                        lambda self, *args: passes.append(args[0].is_contiguous()) or original(self, *args))
    with torch.no_grad():
        check_parity(a, mlifast.Line(a, b), torch.tensor([-0.5, 0.0, 0.4, 1.0, 1.3]), x, dtype=dtype)
    assert passes and (case != "channels-last" or not all(passes))


class CausalEncoder(nn.Module):
    """A causal transformer whose −inf mask is a buffer of its state dict."""

    def __init__(self, length=5, dim=8):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x):
        return self.encoder(x, mask=self.mask, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_buffer_of_minus_infinity_stays_the_same_at_every_point(dtype):
    a, b = pair(CausalEncoder, dtype)
    x = torch.randn(3, 5, 8, dtype=dtype)
    with torch.no_grad():
        check_parity(a, mlifast.Line(a, b), torch.tensor([-0.5, 0.0, 0.6, 1.0]), x, dtype=dtype)


class Activated(nn.Module):
    """conv → batch norm → `act` (a functional call), twice: a MobileNet or EfficientNet block."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.c1, self.n1 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.n2(self.c2(self.act(self.n1(self.c1(x)))))))


# name: (activation, whether oneDNN's post-op computes it: the same NaN and ±inf as PyTorch)
ACTIVATIONS = {
    "Hardswish": (nn.Hardswish(), True), "SiLU": (nn.SiLU(), True), "silu in place": (lambda x: F.silu(x, True), True),
    "GELU tanh": (nn.GELU(approximate="tanh"), True), "leaky_relu(0.2)": (lambda x: F.leaky_relu(x, 0.2), True),
    "Sigmoid": (nn.Sigmoid(), True), "sigmoid_": (torch.sigmoid_, True), "tanh method": (lambda x: x.tanh(), True),
    "ReLU": (nn.ReLU(), False), "ReLU6": (nn.ReLU6(), False),  # (oneDNN: NaN → 0)
    "ReLU6 in place": (nn.ReLU6(inplace=True), False),
    "Hardtanh(-2, 3)": (nn.Hardtanh(-2.0, 3.0), False), "Hardsigmoid": (nn.Hardsigmoid(), False),
    "leaky_relu(0)": (lambda x: F.leaky_relu(x, 0.0), False), "GELU": (nn.GELU(), False),  # (oneDNN: inf → NaN)
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activations_after_a_convolution_join_it_as_onednn_post_ops(name, dtype, monkeypatch):
    """Where oneDNN's post-op gives PyTorch's values, NaN included (a NaN pixel spreads
    through the second convolution; ReLU6's post-op would make it 0)."""
    from mlifast.multipoint import pending

    act, joins = ACTIVATIONS[name]
    a, b = pair(lambda: Activated(act), dtype)
    x = torch.randn(8, 8, 16, 16, dtype=dtype)  # (2,048 positions a point: each point's convolution by oneDNN)
    joined = []
    original = pending.PendingConvolution._activated

    def spy(self, post_op):
        activated = original(self, post_op)
        joined.append(activated is not None)
        return activated

    monkeypatch.setattr(pending.PendingConvolution, "_activated", spy)
    line, coords = mlifast.Line(a, b), torch.tensor([-0.3, 0.0, 0.5, 1.0])
    with torch.no_grad():
        fast = check_parity(a, line, coords, x, dtype=dtype)
        x[1, 2, 3, 4] = float("nan")
        out = fast(x)
    for k, expected in enumerate(oracle_outputs(a, line, coords, x)):
        torch.testing.assert_close(out[k], expected, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)
    assert any(joined) is (joins and dtype == torch.float32)  # (oneDNN's post-ops: float32)


def test_frozen_batch_norm_in_train_mode_leaves_the_space_untouched():
    a, b = pair(ResNet20, torch.float64)
    b.bn1.load_state_dict(a.bn1.state_dict())  # the first BN does not move: a plain module in the copy
    a.train()
    line = mlifast.Line(a, b)
    before = {k: v.clone() for k, v in line.origin.items()}
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    out = mlifast.interpolate(a, line, torch.tensor([0.0, 1.0]))(x)
    for key, value in line.origin.items():
        assert torch.equal(value, before[key]), key
    for k, e in enumerate(oracle_outputs(a, line, torch.tensor([0.0, 1.0]), x)):
        assert rel_err(out[k], e) < 1e-9


def test_rows_before_the_first_moving_layer_are_computed_once():
    from mlifast.multipoint.shared import SharedRows

    a, b = pair(mlp, torch.float64)
    b[1].load_state_dict(a[1].state_dict())  # a frozen first layer keeps the rows shared
    seen = []
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 5))
    fast.model[4].register_forward_pre_hook(lambda m, inp: seen.append((type(inp[0]), inp[0].shape[0])))
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    out = fast(x)
    assert fast.shares_rows is True
    assert seen[-1] == (SharedRows, 3)  # B rows reach the first moving layer, not K·B
    for k, e in enumerate(oracle_outputs(a, fast.space, fast.coords[:, 0], x)):
        assert rel_err(out[k], e) < 1e-9


@pytest.mark.parametrize("family", ["no_bn", "fixup"])
def test_a_resnet_shortcuts_subsampling_keeps_rows_shared(family):
    """x[:, :, ::2, ::2] (the option-A shortcut) of rows every point shares stays shared:
    with the first two stages frozen, the second stage's shortcut gives B rows, not K·B.
    (The second review found that slicing copied them for every point.)"""
    from mlifast.models import resnet20
    from mlifast.multipoint.shared import SharedRows

    torch.manual_seed(0)
    a, b = resnet20(family).double().eval(), resnet20(family).double().eval()
    moving = {n for n, _ in a.named_parameters() if n.startswith(("layer3.", "fc."))}
    with torch.no_grad():
        for (name, p), q in zip(b.named_parameters(), a.parameters()):
            p.copy_(p if name in moving else q)
            if name in moving:
                p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = check_parity(a, mlifast.Line(a, b), torch.linspace(0, 1, 4), x, dtype=torch.float64)
    seen = []
    fast.model.layer2[0].downsample.register_forward_hook(lambda m, inp, out: seen.append((type(out), out.shape[0])))
    with torch.no_grad():
        fast(x)
    assert fast.shares_rows is True and seen == [(SharedRows, 3)]


class TransformsSharedRows(torch.nn.Module):
    """Row-wise operations on the input before the first moving layer: the same function
    with different constants, and an activation in place on a result."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = (x * 2) * 3 + x * 3 + x * True + x * -0.0
        return self.lin(torch.nn.functional.leaky_relu(h * 2 - 1, 0.1, inplace=True))


@pytest.mark.parametrize("checked_in_groups", [True, False])
def test_what_shared_rows_compute_is_kept_for_the_next_groups_unless_written(checked_in_groups):
    """x * 2 and x * 3 are kept apart (the constants are in the key), and a kept result
    that an in-place activation wrote into is computed again for the next group (the
    second review found it handed on, activated twice: 27 % off); rows stay shared. With
    the first call checked in groups or not."""
    a, b = pair(TransformsSharedRows, torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 6))
    with torch.no_grad():
        fast.points_per_group = 2 if checked_in_groups else None
        fast(x)
        fast.points_per_group = 2
        out = fast(x)
    assert fast.shares_rows is True
    for k, e in enumerate(oracle_outputs(a, fast.space, fast.coords[:, 0], x)):
        assert rel_err(out[k], e) < 1e-12, k


class ActivatesItsInputInPlace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        torch.nn.functional.leaky_relu(x, 0.1, inplace=True)
        return self.lin(x)


def test_an_input_activated_in_place_is_fresh_for_every_group():
    """An activation with inplace=True on the input itself (rows shared by every point,
    copied once for the call's groups): each group gets the input as given, not the one
    the group before activated (the second review: 11.5 % off), and the caller's tensor
    is untouched."""
    a, b = pair(ActivatesItsInputInPlace, torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    given = x.clone()
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 6))
    with torch.no_grad():
        fast(x)
        fast.points_per_group = 2
        out = fast(x)
    assert torch.equal(x, given) and fast.shares_rows is True
    for k, e in enumerate(oracle_outputs(a, fast.space, fast.coords[:, 0], x)):
        assert rel_err(out[k], e) < 1e-12, k


def test_model_that_captures_the_batch_size_does_not_share_rows():
    torch.manual_seed(0)
    a, b = CapturesBatch().double(), CapturesBatch().double()
    check = check_parity(a, mlifast.Line(a, b), torch.linspace(0, 1, 4), torch.randn(5, 4, dtype=torch.float64),
                         dtype=torch.float64)
    assert check.shares_rows is False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_1d_3d_convolutions_and_rms_norm(dtype):
    from models import SignalNet

    a, b = pair(SignalNet, dtype)
    with torch.no_grad():
        b.norm.weight.add_(0.3)  # default init makes the norms equal: move them
    g = torch.Generator().manual_seed(2)
    signal, volume = torch.randn(3, 2, 8, generator=g).to(dtype), torch.randn(3, 1, 4, 4, 4, generator=g).to(dtype)
    fast = check_parity(a, mlifast.Line(a, b), torch.linspace(-0.5, 1.5, 4), signal, volume, dtype=dtype)
    assert isinstance(fast.model.norm, MultiPointRule)


def test_shape_mismatch_between_model_and_space_is_explained():
    a, b = mlp(), mlp()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    other = nn.Sequential(nn.Flatten(), nn.Linear(12, 17), nn.ReLU(), nn.Dropout(), nn.Linear(17, 16), nn.Tanh(),
                          nn.Linear(16, 5))
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(17, 12\) in the model but \(16, 12\)"):
        mlifast.interpolate(other, mlifast.Line(state, b), 3)


def test_layer_whose_bias_alone_moves():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight.add_(1)
        b[2].bias.add_(1)  # the second layer's weight is fixed along the line
    check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.3, 1.0]), torch.randn(5, 4, dtype=torch.float64),
                 dtype=torch.float64)
