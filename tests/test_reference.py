"""The first-call check's reference (`PerPointModel`): outside autograd, the large weights of
torch's own layers are formed only while their layer runs; wherever that cannot hold (a
parent reading its layer's weight), the point runs again with the whole state. Either way
its outputs are the oracle's."""
import pytest
import torch
from torch import nn

import mlifast
from mlifast.multipoint import reference
from mlifast.multipoint.reference import PerPointModel
from oracle import oracle_outputs, rel_err
from test_memory import peak_bytes


class ReadsItsLayersWeight(nn.Module):  # a parent computing with a child's weight
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return x @ self.fc.weight.t() + self.fc(x)


class ReturnsItsLayersWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x), self.fc.weight


class SwallowsTheRefusal(nn.Module):  # (the refusal must be seen even when caught)
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        try:
            scale = self.fc.weight.abs().mean()
        except RuntimeError:
            scale = torch.tensor(1.0, dtype=x.dtype)
        return self.fc(x) * scale


class SwallowsTheDataRefusal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        try:
            scale = 1 + self.fc.weight.data.abs().mean()
        except RuntimeError:
            scale = torch.tensor(1.0, dtype=x.dtype)
        return self.fc(x) * scale


@torch.jit.script
def _scripted_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # (reads w past torch's dispatch)
    return x @ w.t()


class ScriptReadsItsLayersWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return _scripted_linear(x, self.fc.weight) + self.fc(x)


class Encoder(nn.Module):  # (its nested path asks whether its first layer's weights are plain tensors)
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(6, 2, 12, 0.0, batch_first=True)
        self.encoder, self.fc = nn.TransformerEncoder(layer, 1), nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(self.encoder(x, src_key_padding_mask=torch.tensor([[False, False, True]] * len(x))))


class Attention(nn.Module):  # (MultiheadAttention's forward reads its out_proj's weight)
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


def conv_embedding():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv, self.fc = nn.Embedding(20, 6), nn.Conv1d(6, 6, 3, padding=1), nn.Linear(6, 6)

        def forward(self, tokens):
            return self.fc(self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2))

    return Net()


INPUTS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6)), lambda: (torch.randn(4, 6),)),
    "conv_embedding": (conv_embedding, lambda: (torch.randint(0, 20, (4, 5)),)),
    "attention": (Attention, lambda: (torch.randn(4, 3, 6),)),
    "reads_its_layers_weight": (ReadsItsLayersWeight, lambda: (torch.randn(4, 6),)),
    "returns_its_layers_weight": (ReturnsItsLayersWeight, lambda: (torch.randn(4, 6),)),
    "swallows_the_refusal": (SwallowsTheRefusal, lambda: (torch.randn(4, 6),)),
    "swallows_the_data_refusal": (SwallowsTheDataRefusal, lambda: (torch.randn(4, 6),)),
    "script_reads_its_layers_weight": (ScriptReadsItsLayersWeight, lambda: (torch.randn(4, 6),)),
    "encoder": (Encoder, lambda: (torch.randn(4, 3, 6),)),
}
FORMED_PER_LAYER = {"mlp", "conv_embedding", "attention", "encoder"}  # (the others read a layer's weight outside it)


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("reusing", [False, True])
def test_weights_formed_per_layer_give_the_oracles_outputs(name, reusing, monkeypatch):
    monkeypatch.setattr(reference, "FORMED_PER_MODULE_MIN_BYTES", 0)
    factory, inputs = INPUTS[name]
    torch.manual_seed(0)
    a, b = factory().double().eval(), factory().double().eval()
    line = mlifast.Line(a, b)
    args = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    ref = PerPointModel(a, line)
    assert ref._per_module  # (every weight of its layers: none tied)
    coords = torch.tensor([0.3, 1.0, -0.5], dtype=torch.float64)
    with torch.no_grad():  # (the model's own semantics there: an encoder's nested path)
        expected = oracle_outputs(a, line, coords, *args)
        with (ref.reusing_state() if reusing else torch.no_grad()):
            outs = [ref.at(c.reshape(1), args, {}) for c in coords]
    for k, (out, want) in enumerate(zip(outs, expected)):
        for o, w in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
            assert type(o) is torch.Tensor and rel_err(o, w) < 1e-12, (name, k)
    assert bool(ref._per_module) == (name in FORMED_PER_LAYER)


def test_tied_and_frozen_weights_are_in_the_whole_state(monkeypatch):
    monkeypatch.setattr(reference, "FORMED_PER_MODULE_MIN_BYTES", 0)

    def tied():
        m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
        m[2].weight = m[0].weight
        return m

    torch.manual_seed(0)
    a, b = tied(), tied()
    b[1].load_state_dict(a[1].state_dict())  # frozen
    line = mlifast.Line(a, b)
    ref = PerPointModel(a, line)
    assert ref._per_module == set()
    x = torch.randint(0, 10, (3,))
    with torch.no_grad():
        out = ref.at(torch.tensor([0.7], dtype=torch.float64), (x,), {})
    assert rel_err(out, oracle_outputs(a, line, torch.tensor([0.7]), x)[0]) < 1e-6


class WeightAlsoABuffer(nn.Module):  # one tensor under two names, one not in the state dict
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("weight_again", self.fc.weight, persistent=False)

    def forward(self, x):
        return self.fc(x) + x @ self.weight_again


@pytest.mark.parametrize("grad", [False, True])
def test_a_tensor_under_two_names_takes_the_points_value_under_both(grad, monkeypatch):
    monkeypatch.setattr(reference, "FORMED_PER_MODULE_MIN_BYTES", 0)
    torch.manual_seed(0)
    a, b = WeightAlsoABuffer().double(), WeightAlsoABuffer().double()
    line = mlifast.Line(a, b)
    ref = PerPointModel(a, line)
    x, at = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        out = ref.at(at, (x,), {})
    state = line.state_at(0.7)
    w, bias = state["fc.weight"], state["fc.bias"]
    assert rel_err(out, x @ w.t() + bias + x @ w) < 1e-12


def test_a_reference_point_holds_one_layers_weights_not_the_whole_state():
    torch.manual_seed(0)
    a, b = (nn.Sequential(*(nn.Linear(512, 512) for _ in range(6))) for _ in range(2))
    weight_bytes = 512 * 512 * 4
    line = mlifast.Line(a, b)
    ref = PerPointModel(a, line)
    x, at = torch.randn(2, 512), torch.tensor([0.5], dtype=torch.float64)
    with torch.no_grad():
        ref.at(at, (x,), {})  # (warm-up)
        per_layer = peak_bytes(lambda: ref.at(at, (x,), {}))
    assert per_layer < 1.5 * weight_bytes, per_layer / weight_bytes
    whole = peak_bytes(lambda: ref.at(at, (x,), {}))  # (under autograd: the whole state)
    assert whole > 6 * weight_bytes, whole / weight_bytes


def test_an_interrupt_leaves_no_formed_weight_in_the_copy(monkeypatch):
    monkeypatch.setattr(reference, "FORMED_PER_MODULE_MIN_BYTES", 0)

    def interrupt(*_):  # (Ctrl-C inside the layer: forward hooks then do not run)
        raise KeyboardInterrupt

    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(6, 6)), nn.Sequential(nn.Linear(6, 6))
    a[0].register_forward_hook(interrupt)
    ref = PerPointModel(a, mlifast.Line(a, b))
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        ref.at(torch.tensor([0.5], dtype=torch.float64), (torch.randn(2, 6),), {})
    assert isinstance(ref.module[0]._parameters["weight"], reference._FormedElsewhere)
