"""copy_module_tree against copy.deepcopy: the same tree, attributes, hooks and sharing."""
import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from mlifast.multipoint.module_copy import copy_module_tree


class Tagged(nn.Module):
    """Custom attributes of every kind a module may hold, and a __getstate__ of its own."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.config = {"widths": [3, 3], "name": "t", "nested": OrderedDict(a=(1, 2.0))}
        self.labels = {"x", "y"}
        self.scale = 2.5
        self.act = torch.tanh
        self.register_buffer("mask", torch.ones(3), persistent=False)
        self.cache = "kept"

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("cache")
        return state

    def forward(self, x):
        return self.act(self.lin(x)) * self.scale * self.mask


class Versioned(nn.Module):
    """A __getstate__ of (dict, version), as torch.ao's LinearPackedParams has."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def __getstate__(self):
        return (super().__getstate__(), 2)

    def __setstate__(self, state):
        d, self.version = state
        super().__setstate__(d)

    def forward(self, x):
        return self.lin(x)


class Named(nn.Linear):
    """Built by __new__ with an argument (__getnewargs__)."""

    def __new__(cls, name, *args, **kwargs):
        self = super().__new__(cls)
        self.name = name
        return self

    def __init__(self, name):
        super().__init__(4, 4)

    def __getnewargs__(self):
        return (self.name,)


class Snapshot(nn.Module):
    """Holds a state_dict: an OrderedDict whose _metadata attribute load_state_dict reads."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.snapshot = self.lin.state_dict()

    def forward(self, x):
        return self.lin(x)


class Registry(nn.Module, dict):
    """A module that is also a dict: its items travel in __reduce_ex__, not its state."""

    __hash__, __eq__ = object.__hash__, object.__eq__

    def __init__(self):
        nn.Module.__init__(self)
        dict.__init__(self)
        self.lin = nn.Linear(4, 4)
        self["scale"] = 2.0

    def forward(self, x):
        return self.lin(x) * self["scale"]


def own_deepcopy():
    """A module given its own __deepcopy__ on the instance."""
    m = nn.Linear(4, 4)
    m.__deepcopy__ = lambda memo: nn.Identity()
    return nn.Sequential(m, nn.ReLU())


def models():
    shared = nn.Linear(4, 4)
    hooked = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    hooked[0].register_forward_hook(lambda m, i, o: o * 2)
    return {
        "mlp": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        "shared submodule": nn.Sequential(shared, nn.Tanh(), shared),
        "forward hook": hooked,
        "lstm": nn.LSTM(4, 5, num_layers=2),
        "transformer": nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2),
        "batch norm cnn": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        "parametrized (own __deepcopy__)": parametrizations.weight_norm(nn.Linear(4, 4)),
        "custom attributes and __getstate__": Tagged(),
        "__getstate__ of a tuple": nn.Sequential(Versioned(), nn.ReLU()),
        "__getnewargs__": nn.Sequential(Named("a"), nn.ReLU()),
        "OrderedDict with attributes": Snapshot(),
        "traced submodule": nn.Sequential(torch.jit.trace(nn.Linear(4, 4), torch.randn(1, 4)), nn.ReLU()),
        "a module that is a dict": nn.Sequential(Registry(), nn.ReLU()),
        "__deepcopy__ on the instance": own_deepcopy(),
    }


def meta_memo(model):
    return {id(t): torch.empty_like(t, device="meta") for t in list(model.parameters()) + list(model.buffers())}


def assert_same_copy(a, b, memo_a, memo_b, path="model"):
    """a (copy.deepcopy) and b (copy_module_tree) hold equal values; tensors from each memo."""
    assert type(a) is type(b), path
    if isinstance(a, dict) and isinstance(a, nn.Module):
        assert dict(a) == dict(b), path  # (its items, beside its state)
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, path
        if a.device.type != "meta":
            assert torch.equal(a, b), path
        return
    if isinstance(a, nn.Module):
        assert a.__dict__.keys() == b.__dict__.keys(), path
        for k in a.__dict__:
            assert_same_copy(a.__dict__[k], b.__dict__[k], memo_a, memo_b, f"{path}.{k}")
    elif isinstance(a, dict):
        assert list(a) == list(b) and vars(a) == vars(b) if hasattr(a, "__dict__") else list(a) == list(b), path
        for k in a:
            assert_same_copy(a[k], b[k], memo_a, memo_b, f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_copy(x, y, memo_a, memo_b, f"{path}[{i}]")
    elif callable(a) and not isinstance(a, type):
        assert callable(b), path
    elif isinstance(a, (int, float, complex, str, bytes, type(None), torch.dtype, torch.device, set, frozenset)):
        assert a == b, path  # (other objects, such as a ScriptModule's _c, are compared by type only)


@pytest.mark.parametrize("name", list(models()))
def test_same_as_deepcopy(name):
    model = models()[name]
    memo_a, memo_b = meta_memo(model), meta_memo(model)
    expected, got = copy.deepcopy(model, memo_a), copy_module_tree(model, memo_b)
    assert_same_copy(expected, got, memo_a, memo_b)
    expected_tensors = dict(list(expected.named_parameters()) + list(expected.named_buffers()))
    for key, t in list(got.named_parameters()) + list(got.named_buffers()):
        from_memo = any(v is expected_tensors[key] for v in memo_a.values())  # (a jit module copies its own)
        assert from_memo == any(v is t for v in memo_b.values()), key
    got_modules = dict(got.named_modules(remove_duplicate=False))
    for path, module in model.named_modules(remove_duplicate=False):
        assert got_modules[path] is not module, path  # a copy, not the original
        for k, v in module.__dict__.items():
            if isinstance(v, (dict, list, set)):
                assert got_modules[path].__dict__[k] is not v, f"{path}.{k}"  # (hooks: not shared)


def test_sharing_kept_and_originals_untouched():
    model = models()["shared submodule"]
    got = copy_module_tree(model, meta_memo(model))
    assert got[0] is got[2] and got[0] is not model[0]
    assert model[0].weight.device.type == "cpu"


INPUTS = {"forward hook": (2, 4), "lstm": (5, 2, 4), "transformer": (2, 3, 8), "custom attributes and __getstate__": (2, 3)}


@pytest.mark.parametrize("name", list(INPUTS))
def test_copy_runs_like_the_model(name):
    torch.manual_seed(0)
    model = models()[name].eval()
    copied = copy_module_tree(model, {})  # (no memo: every tensor copied)
    x = torch.randn(INPUTS[name])
    expected, got = model(x), copied(x)
    if name == "lstm":
        expected, got = expected[0], got[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_state_from_getstate():
    copied = copy_module_tree(Tagged(), {})
    assert "cache" not in copied.__dict__ and copied.labels == {"x", "y"}
