"""Convolution and batch norm in both forms a rule can take (layers.one_point_per_call):
ATen's kernel once per point with that point's parameters (the CPU's form) and one wide
call over the rows of all points (a GPU's form, forced here on the CPU), each against
the one-point-at-a-time oracle."""
import collections
import warnings

import pytest
import torch

import mlifast
import test_evaluate
import test_interpolate
from mlifast.multipoint import combination, layers, pending
from models import ResNet20, vgg_like


@pytest.fixture(params=["one point per call", "wide"])
def form(request, monkeypatch):
    if request.param == "wide":
        monkeypatch.setattr(layers, "one_point_per_call", lambda x: False)
    else:  # every convolution here is small: take the per-point form whatever the size
        monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    return request.param


def conv2d_calls(fast, x, post_ops=None):
    """(images, channels-last?) of each 2-d convolution of one call of `fast` after its
    first (float32 images travel channels-last on the CPU unless the model rejects that
    layout): F.conv2d's, and oneDNN's with post-ops (pending.py), whose (addend?, ReLU?)
    are appended to `post_ops`."""
    calls, conv2d, pointwise = [], torch.nn.functional.conv2d, pending._ONEDNN_POINTWISE
    post_ops = [] if post_ops is None else post_ops

    def record(x):
        calls.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last)))

    class Joined:  # (x, w, b, padding, stride, dilation, groups, unary, …) or .binary(x, addend, w, …, unary, …)
        def __call__(self, x, *args):
            record(x)
            post_ops.append((False, args[6] == "relu"))
            return pointwise(x, *args)

        def binary(self, x, *args):
            record(x)
            post_ops.append((True, args[9] == "relu"))
            return pointwise.binary(x, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "conv2d", lambda x, *args: record(x) or conv2d(x, *args))
        if pointwise is not None:
            mp.setattr(pending, "_ONEDNN_POINTWISE", Joined())
        fast(x)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("factory", [ResNet20, vgg_like])
def test_conv_batch_norm_models_on_a_line(form, factory, dtype):
    a, b = test_interpolate.pair(factory, dtype)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    test_interpolate.check_parity(a, mlifast.Line(a, b), torch.linspace(-0.25, 1.25, 5), x, dtype=dtype)


def test_conv_batch_norm_model_on_a_plane(form):
    a, b = test_interpolate.pair(ResNet20, torch.float32)
    _, c = test_interpolate.pair(ResNet20, torch.float32, seed=7)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.3, -0.4], [1.2, 0.5]], dtype=torch.float64)
    test_interpolate.check_parity(a, mlifast.Plane.through(a, b, c), coords, x, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_1d_3d_convolutions(form, dtype):
    test_interpolate.test_1d_3d_convolutions_and_rms_norm(dtype)


@pytest.mark.parametrize("bn", ["interpolate", "recompute", "batch"])
def test_batch_norm_policies(form, bn):
    test_evaluate.test_bn_policies_match_the_loop(bn)


def test_batch_norm_without_affine_or_running_stats(form):
    test_evaluate.test_batch_norm_without_affine_or_running_stats()


def test_which_calls_each_form_makes(form):
    a, b = test_interpolate.pair(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)),
                                 torch.float32)
    fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), torch.randn(2, 3, 8, 8),
                                         dtype=torch.float32)
    calls = conv2d_calls(fast, torch.randn(2, 3, 8, 8))  # the first call's checks are done: the model's own
    first_layer = [(2, True)] * 2  # J + 1 = 2 calls on the 2 rows shared by every point
    if form == "wide":  # and the second layer too: 2 calls over the rows of all 3 points
        assert calls == first_layer + [(6, True)] * 2
    else:  # the second layer: one call per point on its 2 rows
        assert calls == first_layer + [(2, True)] * 3


class PaddedLayers(torch.nn.Module):  # every padding a convolution's own forward applies, an embedding's padding_idx
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, padding_idx=0)
        self.c1 = torch.nn.Conv1d(4, 4, 3, padding=2, padding_mode="circular", dilation=2)
        self.c2 = torch.nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect", stride=2)
        self.c3 = torch.nn.Conv3d(4, 2, 2, padding="same", padding_mode="replicate", groups=2, bias=False)

    def forward(self, tokens):
        h = self.c1(self.emb(tokens).transpose(1, 2))  # (N, 4, T)
        h = self.c2(h.unsqueeze(1))  # (N, 4, 2, T/2)
        return self.c3(h.unsqueeze(2).expand(-1, -1, 2, -1, -1)).flatten(1)


@pytest.mark.parametrize("hooked", [False, True])
def test_the_wide_forms_products_run_each_layers_own_forward(hooked, monkeypatch):
    """Without functional_call (its swapping of tensors costs more than a GPU's launch);
    a hooked layer still through it, its hooks called as before."""
    monkeypatch.setattr(layers, "one_point_per_call", lambda x: False)
    through_functional_call = []
    functional_call = layers.functional_call
    monkeypatch.setattr(layers, "functional_call",
                        lambda m, *a: through_functional_call.append(m) or functional_call(m, *a))
    a, b = test_interpolate.pair(PaddedLayers, torch.float64)
    seen = []
    if hooked:
        a.c2.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape) and None)
    tokens = torch.tensor([[0, 3, 5, 0, 9, 2, 1, 4], [7, 0, 0, 2, 2, 8, 6, 3]])
    fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.3, 1.2]), tokens,
                                         dtype=torch.float64)
    assert not fast.per_point_fallback
    assert [type(m).__name__ for m in through_functional_call] == ["Conv2d"] * 2 * hooked  # (J + 1 products)
    assert sum(shape[0] == 3 * 2 for shape in seen) == 2 * hooked  # (the products' rows of all points)


class GainConv(torch.nn.Conv2d):  # a subclass's own _conv_forward, reading a parameter of its own
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = torch.nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, weight * self.gain, bias)


class OwnWeightConv(torch.nn.Conv2d):  # ... or reading its weight itself
    def _conv_forward(self, input, weight, bias):
        return torch.nn.functional.conv2d(input, self.weight, self.bias, self.stride, self.padding)


class MaskedConv(torch.nn.Conv2d):  # PixelCNN's: a fixed mask of its own, affine in the weight: given ConvRule
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask = torch.ones_like(self.weight)
        mask[:, :, 2] = 0
        self.register_buffer("mask", mask)

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, weight * self.mask, bias)


@pytest.mark.parametrize("side", [8, 40])  # (40: float32 per point, where Winograd would take a plain Conv2d)
def test_a_convolution_given_the_rule_keeps_its_own_conv_forward(form, side, monkeypatch):
    from mlifast.multipoint import registry
    monkeypatch.setitem(registry.RULES, MaskedConv, layers.ConvRule)
    a, b = test_interpolate.pair(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                                             MaskedConv(16, 16, 3, padding=1)), torch.float32)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x,
                                             dtype=torch.float32)
    assert isinstance(fast.model[2], layers.ConvRule) and not fast.per_point_fallback
    assert fast.images_channels_last  # (a wrong convolution would have the check drop the layout)


class ScaledEmbedding(torch.nn.Module):  # a user's row-wise layer given the embedding's rule (Gemma's scale)
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(10, 4))

    def forward(self, tokens):
        return torch.nn.functional.embedding(tokens, self.weight) * 2.0


@pytest.mark.parametrize("side", [8, 48])  # (48: each point's rows through the layer on the CPU)
@pytest.mark.parametrize("conv", [GainConv, OwnWeightConv])
def test_a_convolution_overriding_its_conv_forward_runs_it_at_each_point(form, conv, side):
    a, b = test_interpolate.pair(lambda: torch.nn.Sequential(conv(3, 4, 3, padding=1), torch.nn.ReLU(),
                                                             conv(4, 2, 3, padding=1)), torch.float64)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.4, 1.0]), x,
                                         dtype=torch.float64)
    assert not fast.per_point_fallback


def test_products_run_hooks_on_every_module_and_a_users_layer_given_the_embeddings_rule(form, monkeypatch):
    from mlifast.multipoint import registry
    monkeypatch.setitem(registry.RULES, ScaledEmbedding, layers.EmbeddingRule)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = ScaledEmbedding(), torch.nn.Conv1d(4, 3, 3, padding=1)

        def forward(self, tokens):
            return self.conv(self.emb(tokens).transpose(1, 2))

    a, b = test_interpolate.pair(Net, torch.float64)
    tokens = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    # (in the per-point form a convolution is no module call: a hook on it falls back, as documented)
    def doubled(module, args, out):
        return out * 2 if isinstance(module, torch.nn.Conv1d) and form == "wide" else None

    handle = torch.nn.modules.module.register_module_forward_hook(doubled)
    try:
        fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.4, 1.0]), tokens,
                                             dtype=torch.float64)
    finally:
        handle.remove()
    assert not fast.per_point_fallback


@pytest.mark.parametrize("side, channels, per_point", [(8, 8, False), (32, 8, True), (16, 8, False), (16, 64, True),
                                                      (8, 64, False)])
def test_convolutions_take_the_per_point_form_from_enough_positions(side, channels, per_point):
    """ConvRule.PER_POINT_MIN_POSITIONS: 2 images of 8×8 (128 positions a point) take the
    stacked form, 2 of 32×32 (2,048) one call per point; 2 of 16×16 (512) one call per point
    only where the convolution is large (64 × 64 channel pairs, not 8 × 8)."""
    a, b = test_interpolate.pair(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, channels, 1),
                                                             torch.nn.Conv2d(channels, channels, 1)), torch.float32)
    x = torch.randn(2, 3, side, side)
    fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x, dtype=torch.float32)
    second_layer = conv2d_calls(fast, x)[2:]
    assert second_layer == ([(2, True)] * 3 if per_point else [(6, True)] * 2)


@pytest.mark.parametrize("channels, per_point", [(16, True), (12, False)])
def test_from_1024_positions_winograd_takes_the_per_point_form(channels, per_point):
    """2 images of 16 × 32 (1,024 positions, 64 tiles a point): a 3 × 3 convolution of 16
    channels, which Winograd computes, in the per-point form (one call, each point's weight
    on its own 2 images); of 12 channels (not a multiple of 16, and few channel pairs) the
    stacked form."""
    a, b = test_interpolate.pair(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, channels, 1),
                                                             torch.nn.Conv2d(channels, 16, 3, padding=1)),
                                 torch.float32)
    x = torch.randn(2, 3, 16, 32)
    fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x, dtype=torch.float32)
    winograd, calls = pending._WINOGRAD_OUT, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pending, "_WINOGRAD_OUT", lambda *args, **kwargs: calls.append(
            (args[0].shape[0], tuple(args[1].shape[:2]))) or winograd(*args, **kwargs))
        second_layer = conv2d_calls(fast, x)[2:]
    assert (calls, second_layer) == (([(6, (3, 16))], []) if per_point else ([], [(6, True)] * 2))


def test_gauss_length_through_convolutions_and_batch_norm(form):
    """Forward-mode derivatives (analysis.geometry) through both forms, running statistics
    moving along the line too, against nested jvp of the model itself."""
    import torch.nn.functional as F
    from torch.func import jvp

    from mlifast.analysis.geometry import gauss_length
    from models import randomize_bn

    def net(seed):
        torch.manual_seed(seed)
        return randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
                                                torch.nn.Conv2d(4, 3, 3), torch.nn.Flatten()), seed).double().eval()

    a, b = net(0), net(1)
    line = mlifast.Line(a, b)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    alphas = torch.linspace(0, 1, 5, dtype=torch.float64)

    def z(t):  # the model by hand: ATen's batch norm takes no tangents of running statistics
        p = {k: line.origin[k] + t * line.direction(k)[0] for k in line.keys if line.origin[k].is_floating_point()}
        h = F.conv2d(x, p["0.weight"], p["0.bias"])
        h = (h - p["1.running_mean"][:, None, None]) / (p["1.running_var"][:, None, None] + 1e-5).sqrt()
        h = torch.tanh(h * p["1.weight"][:, None, None] + p["1.bias"][:, None, None])
        return F.conv2d(h, p["3.weight"], p["3.bias"]).flatten(1)

    curvature = []
    for t in alphas:
        v, acc = jvp(lambda s: jvp(z, (s,), (torch.ones_like(s),))[1], (t,), (torch.ones_like(t),))
        n = v / v.norm(dim=1, keepdim=True)
        curvature.append((acc - n * (n * acc).sum(1, keepdim=True)).norm(dim=1) / v.norm(dim=1))
    expected = torch.trapezoid(torch.stack(curvature), alphas, dim=0).mean().item()
    got = gauss_length(a, line, [(x, None)], alphas=alphas)
    assert expected > 0.01
    assert abs(got - expected) < 1e-9 * expected


class LeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 6, 5), torch.nn.Conv2d(6, 16, 5)
        self.fc = torch.nn.Linear(400, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.view(-1, 16 * 5 * 5))


def test_the_models_own_view_after_a_convolution_works():
    """A LeNet-style `x.view(-1, 16 * 5 * 5)` after convolutions and pooling raises on
    channels-last activations: the first call's check runs the images again in the model's
    own layout, which they keep (2 × 16 images of 32×32: per-point form in both layers)."""
    a, b = test_interpolate.pair(LeNet, torch.float32)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x, dtype=torch.float32)
    assert not fast.per_point_fallback and fast.images_channels_last is False
    assert conv2d_calls(fast, x)[2:] == [(16, False)] * 3


def test_evaluate_probes_in_the_models_own_layout():
    """evaluate's probe of activation sizes runs before any check: in the model's own
    layout, or LeNet's `.view` would raise there."""
    a, b = test_interpolate.pair(LeNet, torch.float32)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    line, alphas = mlifast.Line(a, b), [0.0, 0.5, 1.0]
    res = mlifast.evaluate(a, line, data, coords=torch.tensor(alphas), progress=False)
    expected, _ = test_evaluate.loop_evaluate(a, line, data, alphas, "interpolate")
    torch.testing.assert_close(res["loss"], expected, rtol=1e-5, atol=0)


def test_the_probe_runs_images_channels_last_while_undecided_and_decides_nothing():
    """chunking's probe of one point's activation sizes runs images channels-last (the
    layout and so the forms the passes will most likely take: each point's own convolution,
    its output one point's activation), and leaves the layout undecided for the first-call
    check."""
    from mlifast.engine import chunking
    from mlifast.engine.batches import default_forward

    a, b = test_interpolate.pair(lambda: ResNet20(width=16, num_classes=5), torch.float32)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))
    fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]))
    layouts = []
    handle = fast.model.register_forward_pre_hook(lambda _m, args: layouts.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    sizes = chunking.bytes_per_point(fast, batch, default_forward, torch.device("cpu"))
    handle.remove()
    assert layouts == [True] and fast.images_channels_last is None and len(fast.coords) == 3
    assert sizes.largest == 4 * 16 * 32 * 32 * 4  # bytes of one point's stage-1 activation


def test_a_model_failing_in_either_layout_fails_once_in_the_probe():
    """Where channels-last cannot matter (no image travels so: an MLP), the probe runs the
    model once: a bad input raises the model's own error, not chained to a first attempt's."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    other = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    data = [(torch.randn(5, 12), torch.randint(0, 2, (5,)))]
    with pytest.raises(Exception) as raised:
        mlifast.evaluate(model, mlifast.Line(model, other), data, coords=3, progress=False)
    assert raised.value.__context__ is None and raised.value.__cause__ is None


def test_a_model_reading_raw_memory_keeps_its_layout():
    """Reinterpreting an activation's memory as contiguous gives wrong numbers, silently,
    on channels-last activations: the check sees the disagreement and the images travel
    in the model's own layout, still fused."""

    class RawMemory(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            h = self.conv(x)
            h = h.as_strided(h.shape, torch.empty(h.shape).stride())  # as if contiguous
            return self.fc(h.reshape(h.shape[0], -1))

    a, b = test_interpolate.pair(RawMemory, torch.float32)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x, dtype=torch.float32)
    assert not fast.per_point_fallback and not fast.images_channels_last


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, True), (torch.float64, False)])
def test_images_travel_channels_last_where_onednn_takes_them(dtype, channels_last):
    a, b = test_interpolate.pair(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 3)),
                                 dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 1.0]), x, dtype=dtype)
    assert {layout for _, layout in conv2d_calls(fast, x)} == {channels_last}


class ConvBatchNorm(torch.nn.Module):
    """conv → BN (folded while in eval mode), and a conv whose output is also read
    elsewhere: BN over it, plus the output itself."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.c2, self.b2 = torch.nn.Conv2d(4, 4, 3, padding="same", bias=False), torch.nn.BatchNorm2d(4, affine=False)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        y = self.c2(h)
        return (self.b2(y) + y).flatten(1)


def record_combinations(monkeypatch) -> list:
    """(inputs, scales' shape, relu) of each channel_combine call from now on."""
    combine, combined = combination.channel_combine, []
    monkeypatch.setattr(combination, "channel_combine", lambda inputs, scales, shift, relu: combined.append(
        (len(inputs), tuple(scales.shape), relu)) or combine(inputs, scales, shift, relu))
    return combined


def line_parity_on_images(factory, dtype, seed: int, side: int = 16):
    """check_parity of the multi-point model against the oracle, on a line of two of
    `factory`'s models at 3 points, for 2 images of 3 × side × side: (the model, the images)."""
    a, b = test_interpolate.pair(factory, dtype)
    x = torch.randn(2, 3, side, side, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x, dtype=dtype), x


def test_batch_norm_folds_into_the_convolution_before_it(monkeypatch):
    """In eval mode, batch norm right after a per-point convolution scales and shifts that
    convolution's weights instead of running (PendingConvolution); a convolution output
    read by anything else is computed as it is. Equal to the oracle in float64."""
    fast, x = line_parity_on_images(ConvBatchNorm, torch.float64, 5, side=32)
    normalise, normalised = layers.BatchNormRule._pending_affine, []
    monkeypatch.setattr(layers.BatchNormRule, "_pending_affine",
                        lambda self, rows, *args: normalised.append(tuple(rows.shape[:2])) or normalise(self, rows, *args))
    combined = record_combinations(monkeypatch)
    with torch.no_grad():
        fast(x)
    # b1 and the ReLU in c1's combination of its products on the shared images; b2 folded
    # into c2 (per point: 2,048 positions), whose output, read again, is computed as it is
    assert normalised == [] and combined == [(2, (3, 2, 4), True)]



class WritesIntoConvolutions(torch.nn.Module):
    """In-place writes into convolution outputs, one of them through an alias."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)
        self.c2, self.bn = torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c1(self.c0(x))
        alias = y
        y.relu_()  # (the result is not used: `alias` must see the write)
        z = self.c2(alias)
        z += 1
        return self.bn(z).flatten(1)


class ReadsMemory(torch.nn.Module):
    """Reads a convolution's output through `data_ptr` and NumPy, which no operator sees."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.c1(self.c0(x))
        if y.data_ptr() == 0:
            raise RuntimeError("no memory behind the convolution's output")
        return torch.from_numpy(y.detach().numpy() * 2.0).flatten(1)


@pytest.mark.parametrize("factory, side", [(WritesIntoConvolutions, 14), (ReadsMemory, 10)],
                         ids=["in-place writes", "memory reads"])
def test_pending_convolutions_read_otherwise(monkeypatch, factory, side):
    """Convolution outputs (pending on the CPU's per-point form) written in place or read
    without an operator: the oracle's answer, fused."""
    monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    fast, _ = line_parity_on_images(factory, torch.float64, 6, side=side)
    assert not fast.per_point_fallback


class ResidualBlocks(torch.nn.Module):
    """A stem conv → BN → ReLU, then two residual blocks: ResNet-20's
    relu(bn(conv(h)) + h), and torchvision's `out += identity` and an in-place ReLU module."""

    def __init__(self):
        super().__init__()
        self.stem, self.b0 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.c1, self.b1 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.relu, self.fc = torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2)

    def forward(self, x):
        h = torch.nn.functional.relu(self.b0(self.stem(x)))
        h = torch.nn.functional.relu(self.b1(self.c1(h)) + h)
        out = self.b2(self.c2(h))
        out += h
        return self.fc(self.relu(out).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_additions_and_relus_join_the_convolution(monkeypatch, dtype):
    """Batch norm folded, then the residual addition runs as a oneDNN post-op of each
    point's convolution (float32), or as a separate operation (float64), the ReLU in
    place after it (oneDNN's ReLU post-op makes NaN 0): the oracle's answer either way. (The stem reads rows shared by every point: the J + 1
    products, combined with its batch norm and the ReLU after it in one pass.)"""
    monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    fast, x = line_parity_on_images(ResidualBlocks, dtype, 7)
    affine, applied, post_ops = pending.channel_affine, [], []
    monkeypatch.setattr(pending, "channel_affine", lambda rows, scale, shift, addend, relu: applied.append(
        (rows.shape[0], addend is not None, relu)) or affine(rows, scale, shift, addend, relu))
    combined = record_combinations(monkeypatch)
    with torch.no_grad():
        calls = conv2d_calls(fast, x, post_ops)
    assert len(calls) == 2 + 2 * 3  # the stem's products; c1 and c2 at each point
    assert applied == [] and combined == [(2, (3, 2, 8), True)]  # b0 and its ReLU in the stem's combination
    joined = dtype == torch.float32 and pending._ONEDNN_POINTWISE is not None
    assert post_ops == ([(True, False)] * 2 * 3 if joined else [])


class MappedInputs(torch.nn.Module):
    """Batch norms by batch statistics and ReLUs before 3 × 3 convolutions of 16 channels:
    one also read as a residual addend, one through an in-place ReLU module, one added to
    after its ReLU. (A 1 × 1 convolution first: the stem reads each point's own rows.)"""

    def __init__(self):
        super().__init__()
        conv = lambda c_in: torch.nn.Conv2d(c_in, 16, 3, padding=1)  # noqa: E731
        self.pre, self.stem, self.c1, self.c2, self.c3 = torch.nn.Conv2d(3, 3, 1), conv(3), conv(16), conv(16), conv(16)
        self.b0, self.b1, self.b2, self.b3 = (torch.nn.BatchNorm2d(16) for _ in range(4))
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        h = torch.nn.functional.relu(self.b0(self.stem(self.pre(x))))
        y = torch.nn.functional.relu(self.b1(self.c1(h)) + h)
        z = self.relu(self.b2(self.c2(y)))
        out = torch.nn.functional.relu(self.b3(self.c3(z))) + y
        return out.mean((2, 3))


def test_a_batch_norm_and_relu_run_in_the_next_convolutions_input_step(monkeypatch):
    """In train mode, a pending batch norm's map (and the ReLU after it) runs in the input
    step of the Winograd convolution after it (c1, c3), rather than in a pass of its own; a
    read elsewhere (h as the addend) computes it as well, and a ReLU comes before an addition
    after it. The oracle's answer in float32."""
    a, b = test_interpolate.pair(MappedInputs, torch.float32)
    a.train(), b.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mapped, affine, applied = [], pending.channel_affine, []
    winograd = pending._WINOGRAD_OUT
    monkeypatch.setattr(pending, "_WINOGRAD_OUT", lambda *args, **kwargs: mapped.append(
        (args[6] is not None, args[8])) or winograd(*args, **kwargs))
    monkeypatch.setattr(pending, "channel_affine", lambda rows, scale, shift, addend, relu: applied.append(
        (addend is not None, relu)) or affine(rows, scale, shift, addend, relu))
    with torch.no_grad():
        fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x,
                                             dtype=torch.float32)
        mapped.clear(), applied.clear()
        fast(x)
    assert not fast.per_point_fallback
    assert mapped == [(True, True), (False, False), (True, True)]  # c1, c2, c3, each one call for the 3 points
    # b0 (for h the addend), b1 with the addend, b3 then + y; not b2
    assert sorted(applied) == [(False, True), (False, True), (True, True)]


def test_a_relud_batch_norm_on_either_side_of_an_addition_lets_a_convolution_take_it_as_addend():
    """relu(bn(·)) + conv(·) and conv(·) + relu(bn(·)): the ReLU'd batch norm, still pending,
    cannot take an addend (its ReLU comes first), so the convolution is asked and takes it."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(8, 16, 24, 24, generator=g).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(2, 16, generator=g) + 0.5, torch.randn(2, 16, generator=g)
    weight, bias = torch.randn(2, 16, 16, 3, 3, generator=g) * 0.1, torch.randn(2, 16, generator=g)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    expected = None
    for left in (True, False):
        with torch.no_grad():
            relu_bn = torch.nn.functional.relu(pending.PendingAffine(rows, scale, shift))
            c = pending.PendingConvolution(conv, rows.unflatten(0, (2, 4)), weight, bias)
            total = relu_bn + c if left else c + relu_bn
            assert type(total) is pending.PendingConvolution and total._addend is not None
            result = total.materialize()
        expected = result if expected is None else expected
        assert torch.equal(result, expected)
    plain = torch.relu(rows.unflatten(0, (2, -1)) * scale[:, None, :, None, None] + shift[:, None, :, None, None])
    convolved = torch.cat([torch.nn.functional.conv2d(r, w, b_, padding=1) for r, w, b_ in
                           zip(rows.unflatten(0, (2, 4)), weight, bias)])
    assert torch.allclose(expected, plain.flatten(0, 1) + convolved, atol=1e-4)


class WritesIntoMappedRows(torch.nn.Module):
    """Writes into a batch norm's input after the convolution after it took its map (a
    1 × 1 convolution first: the stem reads each point's own rows)."""

    def __init__(self):
        super().__init__()
        self.pre, self.stem = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.b0, self.b1 = torch.nn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)

    def forward(self, x):
        s = self.stem(self.pre(x))
        y = self.c1(torch.relu(self.b0(s)))
        s.mul_(2.0)
        return (self.b1(y) + s).mean((2, 3))


def test_a_write_into_mapped_rows_is_seen():
    a, b = test_interpolate.pair(WritesIntoMappedRows, torch.float32)
    a.train(), b.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x,
                                             dtype=torch.float32)
    assert not fast.per_point_fallback and not fast.context.defer_pending


@pytest.mark.parametrize("bn", ["recompute", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_statistics_residual_additions_and_relus_are_one_pass(monkeypatch, dtype, bn):
    """Under batch statistics (the recompute policy's pass, or bn="batch") a batch norm
    reads its input once for the statistics (channel_moments) and once more to apply
    them, with the residual addition and the ReLU after it (channel_affine, pending);
    the loop's losses."""
    monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    a, b = test_interpolate.pair(ResidualBlocks, dtype)
    data = [(x.to(dtype), y.remainder(2)) for x, y in test_evaluate.batches(n=8, batch=4, shape=(3, 8, 8))]
    affine, applied = pending.channel_affine, []
    monkeypatch.setattr(pending, "channel_affine", lambda rows, scale, shift, addend, relu: applied.append(
        (addend is not None, relu)) or affine(rows, scale, shift, addend, relu))
    combined = record_combinations(monkeypatch)
    line = mlifast.Line(a, b)
    res = mlifast.evaluate(a, line, data, coords=3, bn=bn, progress=False)
    losses, _ = test_evaluate.loop_evaluate(a, line, data, res.alphas.tolist(), bn)
    torch.testing.assert_close(res["loss"], losses, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)
    # Per call of the model under batch statistics: b0 and its ReLU (the points run in one
    # group: the stem's combination computed, then b0's passes); b1, the shortcut and the
    # ReLU; b2, `+= h` and the in-place ReLU module. Then for "recompute" each batch's
    # evaluation with the recomputed statistics: b0 and its ReLU in the stem's combination
    # (b1, b2 fold into c1, c2).
    statistics_calls = applied.count((True, True)) // 2
    assert statistics_calls >= len(data) and set(applied) == {(False, True), (True, True)}
    folded = combined.count((2, (3, 2, 8), True))
    assert set(combined) <= {(2, (3, 2, 8), True), (2, (3, 2, 8), False)}
    assert folded == (len(data) if bn == "recompute" else 0)
    assert applied.count((False, True)) == statistics_calls


class WritesIntoBatchNormInput(torch.nn.Module):
    """Writes into a batch norm's input after the batch norm, before its output is read."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        y = self.bn(h)
        h.mul_(2)
        return self.fc((torch.relu(y) + h).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_write_into_what_a_pending_batch_norm_reads_computes_it_at_once(monkeypatch, dtype):
    monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    fast, _ = line_parity_on_images(WritesIntoBatchNormInput, dtype, 8)
    assert not fast.per_point_fallback and fast.context.defer_pending is False


class ReturnsPendingAfterWrite(torch.nn.Module):
    """Returns a batch norm's output, unread, after writing into what it reads: its input
    (`input`), or the addend of `+=` (`addend`)."""

    def __init__(self, written):
        super().__init__()
        self.written, self.fc, self.bn = written, torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.fc(x) * 1.0
        y = self.bn(h)
        if self.written == "input":
            h.mul_(2)
        else:
            y += h
            h.add_(5)
        return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("written", ["input", "addend"])
def test_a_pending_output_is_computed_inside_the_call(dtype, written):
    """A pending result returned as the model's output is computed before the call ends,
    where a write into what it reads still runs the call again: the oracle's answer."""
    a, b = test_interpolate.pair(lambda: ReturnsPendingAfterWrite(written), dtype)
    x = torch.randn(5, 4, dtype=dtype, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        fast = test_interpolate.check_parity(a, mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0]), x, dtype=dtype)
    assert not fast.per_point_fallback and fast.context.defer_pending is False


class WritesIntoConvolutionInput(torch.nn.Module):
    """Writes into an activation after a convolution read it, before anything read the
    convolution's output: its input rows (`input`) or the addend of a residual addition."""

    def __init__(self, written="input"):
        super().__init__()
        self.written = written
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn, self.fc = torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2)

    def forward(self, x):
        h = torch.nn.functional.relu(self.c1(x))
        y = self.c2(h)
        if self.written == "input":
            h.mul_(2)
        s = self.bn(y) + h
        if self.written == "addend":
            h.add_(1)
        return self.fc((torch.relu(s) + h).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("written", ["input", "addend"])
def test_a_write_into_what_a_pending_convolution_reads_computes_it_at_once(monkeypatch, written, dtype):
    """The call runs again with convolutions computed at once (their output then reads the
    rows before the write): the oracle's answer, still fused."""
    monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    fast, _ = line_parity_on_images(lambda: WritesIntoConvolutionInput(written), dtype, 8)
    assert not fast.per_point_fallback and fast.context.defer_pending is False


def test_convolutions_under_inference_mode(monkeypatch):
    """Inference tensors have no version counter to show a write into a pending
    convolution's input: their convolutions are computed at once. The oracle's answer."""
    monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    a, b = test_interpolate.pair(ResidualBlocks, torch.float32)
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    fast = mlifast.interpolate(a, line, coords)
    with torch.inference_mode():
        out = fast(x)
    for k, expected in enumerate(test_interpolate.oracle_outputs(a, line, coords, x)):
        assert test_interpolate.rel_err(out[k], expected) < test_interpolate.TOL[torch.float32]
    assert not fast.per_point_fallback


class BatchNormAfterResidual(torch.nn.Module):
    """bn(conv(h) + h): the addition joins the convolution, the batch norm cannot fold."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn, self.fc = torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.fc(torch.relu(self.bn(self.c2(h) + h)).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_after_a_joined_addition(monkeypatch, dtype):
    monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    fast, _ = line_parity_on_images(BatchNormAfterResidual, dtype, 10)
    assert not fast.per_point_fallback


@pytest.mark.parametrize("bn", ["interpolate", "recompute"])
def test_float32_resnet_evaluation_joins_its_blocks(monkeypatch, bn):
    """evaluate on a float32 ResNet-20 in the CPU's per-point form (after the recompute
    pass for "recompute"): batch norms folded, residual additions and ReLUs run as oneDNN
    post-ops; the loop's losses."""
    monkeypatch.setattr(layers.ConvRule, "PER_POINT_MIN_POSITIONS", 0)
    a, b = test_interpolate.pair(lambda: ResNet20(num_classes=5), torch.float32)
    data = [(x.float(), y) for x, y in test_evaluate.batches(n=12, batch=6, shape=(3, 16, 16))]
    joined, pointwise = [], pending._ONEDNN_POINTWISE
    if pointwise is not None:
        class Counted:
            def __call__(self, *args):
                return joined.append(1) or pointwise(*args)

            def binary(self, *args):
                return joined.append(1) or pointwise.binary(*args)

        monkeypatch.setattr(pending, "_ONEDNN_POINTWISE", Counted())
    line = mlifast.Line(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (no fallback to one point at a time)
        res = mlifast.evaluate(a, line, data, coords=3, bn=bn, progress=False)
    losses, _ = test_evaluate.loop_evaluate(a, line, data, res.alphas.tolist(), bn)
    torch.testing.assert_close(res["loss"], losses, rtol=1e-4, atol=0)
    assert pointwise is None or len(joined) > 0


def test_batch_statistics_of_a_winograd_convolution_come_from_its_own_pass(monkeypatch):
    """Under batch statistics a batch norm right after a convolution that Winograd computes
    takes each point's mean and variance from the kernel's `moments`, not from a pass of
    channel_moments of its own: float32 ResNet-20 at width 16 on 32 × 32 images (stages 1
    and 2 Winograd's, stage 3 too few tiles), the loop's losses."""
    gathered, passes = [], []
    winograd_out, moments = pending._WINOGRAD_OUT, layers.channel_moments
    monkeypatch.setattr(pending, "_WINOGRAD_OUT", lambda *args, **kwargs: gathered.append(
        kwargs["moments"] is not None) or winograd_out(*args, **kwargs))
    monkeypatch.setattr(layers, "channel_moments", lambda x, k: passes.append((k, *x.shape[1:3])) or moments(x, k))
    a, b = test_interpolate.pair(lambda: ResNet20(width=16, num_classes=5), torch.float32)
    data = [(x.float(), y) for x, y in test_evaluate.batches(n=8, batch=4, shape=(3, 32, 32))]
    line = mlifast.Line(a, b)
    res = mlifast.evaluate(a, line, data, coords=3, bn="batch", progress=False)
    losses, _ = test_evaluate.loop_evaluate(a, line, data, res.alphas.tolist(), "batch")
    torch.testing.assert_close(res["loss"], losses, rtol=1e-4, atol=0)
    # Per call of the 3 points (channels, side): a pass for the stem's batch norm (16, 32),
    # for those after the stride-2 convolutions (32, 16 and 64, 8), the shortcuts' (16, 16
    # and 32, 8) and stage 3's five others (64, 8); the other eleven of stages 1 and 2 from
    # the kernel. (The chunking's probe of one point runs neither.)
    assert gathered and all(gathered)
    per_call = collections.Counter(p[1:] for p in passes if p[0] == 3)
    calls = per_call[(16, 32)]
    assert calls == len(data) and per_call == {(16, 32): calls, (32, 16): calls, (16, 16): calls, (64, 8): 6 * calls,
                                               (32, 8): calls}
