"""PendingCombination: a first convolution's shared products, a batch norm folded in (by
batch statistics from the products' moments), a ReLU joined; against what it stands for
and, in models, against the oracle."""
import pytest
import torch

import mlifast
import test_interpolate
from mlifast.multipoint import combination
from mlifast.multipoint.combination import PendingCombination, SharedProducts
from mlifast.multipoint.context import PointContext
from mlifast.ops import channel_moments

_MOMENTS, _INIT = SharedProducts.moments, SharedProducts.__init__


def products(n: int, layout=torch.channels_last, dtype=torch.float64, seed: int = 0) -> SharedProducts:
    g = torch.Generator().manual_seed(seed)
    return SharedProducts(torch.randn(5, 6, 4, 7, generator=g, dtype=dtype).mul(j + 1).add(3 * j)
                          .contiguous(memory_format=layout) for j in range(n))


def plainly(shared: SharedProducts, scales: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(K·B, C, …) Σ_j u_j·scales[k, j] + shift[k], by broadcasting."""
    view = lambda v: v.reshape(v.shape[0], 1, v.shape[1], 1, 1)  # noqa: E731
    total = sum(u.unsqueeze(0) * view(scales[:, j]) for j, u in enumerate(shared.products))
    return (total + view(shift)).flatten(0, 1)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_moments_are_those_of_the_combination_it_stands_for(monkeypatch, n, layout):
    """Each point's mean and biased variance from the products' moments equal channel_moments
    of the computed rows (float64), before and after a batch norm's scale and shift fold in;
    in chunks of a few rows as in one."""
    coeffs = torch.tensor([[0.0, 1.0, -0.5], [1.0, 0.25, 2.0], [0.5, -1.0, 0.0]])[:, :n - 1]
    for chunk_values in (combination.MOMENTS_CHUNK_VALUES, 2 * 6 * 4 * 7):
        monkeypatch.setattr(combination, "MOMENTS_CHUNK_VALUES", chunk_values)
        shared = products(n, layout)
        pending = PendingCombination.of(shared, coeffs.double())
        g = torch.Generator().manual_seed(1)
        scale, shift = torch.rand(3, 6, generator=g, dtype=torch.float64) + 0.5, torch.randn(3, 6, generator=g,
                                                                                          dtype=torch.float64)
        for combined in (pending, pending.normalized(scale, shift)):
            mean, var = combined.moments()
            expected_mean, expected_var = channel_moments(plainly(shared, combined._scales, combined._shift), 3)
            torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(var, expected_var, rtol=1e-12, atol=1e-12)
        normalized = pending.normalized(scale, shift)
        expected = plainly(shared, normalized._scales, normalized._shift)
        unnormalized = plainly(shared, pending._scales, pending._shift)
        rows = normalized.materialize()
        assert rows.stride() == expected.contiguous(memory_format=layout).stride()
        torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)
        by_channel = lambda v: v.repeat_interleave(5, 0)[:, :, None, None]  # noqa: E731
        torch.testing.assert_close(rows, unnormalized * by_channel(scale) + by_channel(shift), rtol=1e-12, atol=1e-12)


def test_a_combination_that_cancels_has_no_negative_variance():
    """u_0 − u_1 with u_1 = u_0: every point's variance 0 (never below), its mean its shift."""
    u = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    shared = SharedProducts((u, u.clone()))
    mean, var = PendingCombination.of(shared, torch.tensor([[-1.0], [-1.0]], dtype=torch.float64)).moments()
    assert (var >= 0).all() and var.max() < 1e-28 and mean.abs().max() < 1e-14


def test_a_relu_joins_it_in_place_too_and_anything_else_computes_it():
    shared = products(2, dtype=torch.float32)
    coeffs = torch.tensor([[0.5], [2.0]])
    expected = plainly(shared, PendingCombination.of(shared, coeffs)._scales, torch.zeros(2, 6))
    joined = torch.nn.functional.relu(PendingCombination.of(shared, coeffs))
    assert type(joined) is PendingCombination and not joined.foldable
    pending = PendingCombination.of(shared, coeffs)
    assert torch.relu_(pending) is pending and not pending.foldable
    for result in (joined, pending):
        torch.testing.assert_close(result.materialize(), expected.relu(), rtol=1e-6, atol=1e-6)
    added = PendingCombination.of(shared, coeffs) + 1.0  # (not joined: computed, then added)
    assert type(added) is torch.Tensor
    torch.testing.assert_close(added, expected + 1.0, rtol=1e-6, atol=1e-6)


class StemBatchNorm(torch.nn.Module):
    """A stem convolution → batch norm → ReLU on the input images, then a convolution."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.stem(x)))).flatten(1)


@pytest.mark.parametrize("train", [False, True], ids=["running statistics", "batch statistics"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_plane_through_a_stem_and_its_batch_norm_equals_the_oracle(monkeypatch, dtype, train):
    """Three products (a plane's origin and two directions) combined with each point's batch
    norm, by running or by batch statistics, in one pass of every point: the oracle's
    outputs, channels-last images and contiguous ones alike."""
    combine, combined = combination.channel_combine, []
    monkeypatch.setattr(combination, "channel_combine", lambda inputs, scales, shift, relu: combined.append(
        (len(inputs), relu)) or combine(inputs, scales, shift, relu))
    models = [test_interpolate.pair(StemBatchNorm, dtype, seed)[0].train(train) for seed in (0, 2, 4)]
    plane = mlifast.Plane.through(*models)
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.3, 0.7], [-0.5, 1.5]])
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(3, 3, 10, 10, generator=g, dtype=dtype),
              torch.randn(3, 3, 10, 10, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)):
        for group in (None, 2):  # (batch statistics from the products' moments only for several groups)
            combined.clear()
            with torch.no_grad():
                fast = mlifast.interpolate(models[0], plane, coords)
                fast.points_per_group = group
                fast(x)  # (the first call, checked against the model: rows shared from then on)
                assert fast.shares_rows is True and combined
                combined.clear()
                out = fast(x)
            for k, expected in enumerate(test_interpolate.oracle_outputs(models[0], plane, coords, x)):
                assert test_interpolate.rel_err(out[k], expected) < test_interpolate.TOL[dtype], k
            # (batch statistics from the products' moments from the second group on)
            assert combined == ([(3, not train)] if group is None else [(3, not train), (3, True)])


class StemBatchNormHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("train", [False, True], ids=["running statistics", "batch statistics"])
def test_coordinates_that_carry_derivatives_take_the_products_through_autograd(train):
    """d outputs / d coordinates through a stem and its batch norm (channel_combine has no
    derivatives: the products are combined by autograd's operations then), against finite
    differences; no derivative, the same outputs. (The second review's finding.)"""
    a, b = test_interpolate.pair(StemBatchNormHead, torch.float64, 0)
    a.train(train), b.train(train)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    coords = torch.tensor([[0.0], [0.3], [1.0]], dtype=torch.float64)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), coords)
    with torch.no_grad():
        expected = fast(x)
    assert fast.shares_rows is True
    c = coords.clone().requires_grad_()
    fast.set_coords(c)
    out = fast(x)
    (grad,) = torch.autograd.grad(out.sum(), c)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)
    step = 1e-6
    with torch.no_grad():
        fast.set_coords(coords + step)
        ahead = fast(x).flatten(1).sum(1)
        fast.set_coords(coords - step)
        behind = fast(x).flatten(1).sum(1)
    torch.testing.assert_close(grad[:, 0], (ahead - behind) / (2 * step), rtol=1e-6, atol=1e-8)


class TransformsItsInput(torch.nn.Module):
    """x * 2 - 1 (new memory in every group of points), then a stem, its batch norm, a ReLU."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.stem(x * 2 - 1))).mean((2, 3))


def test_an_input_transformed_before_the_stem_is_computed_once_a_call(monkeypatch):
    """x * 2 - 1 on the shared images is kept for the call's next groups of points (the
    operation and its constants in `reuse`'s key), and with it the stem's products and their
    moments: one SharedProducts a call, batch statistics from its moments from the second
    group on; the oracle's outputs."""
    built = []
    monkeypatch.setattr(SharedProducts, "__init__", lambda self, products: built.append(1) or _INIT(self, products))
    combine, combined = combination.channel_combine, []
    monkeypatch.setattr(combination, "channel_combine", lambda inputs, scales, shift, relu: combined.append(
        relu) or combine(inputs, scales, shift, relu))
    a, b = test_interpolate.pair(TransformsItsInput, torch.float64)
    a.train(), b.train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = mlifast.interpolate(a, mlifast.Line(a, b), torch.linspace(0, 1, 6))
        fast.points_per_group = 2
        fast(x)
        built.clear(), combined.clear()
        out = fast(x)
    for k, expected in enumerate(test_interpolate.oracle_outputs(a, fast.space, fast.coords[:, 0], x)):
        assert test_interpolate.rel_err(out[k], expected) < 1e-9, k
    assert built == [1] and combined == [False, True, True]


def test_products_made_again_for_each_group_take_the_usual_passes(monkeypatch):
    """Products that no later group reuses (here: nothing is kept between groups) never pay
    for their moments: under batch statistics each group computes its combination and the
    usual passes; the oracle's outputs."""
    monkeypatch.setattr(PointContext, "reuse", lambda self, compute, *tensors, owner=None, key=None: compute())
    combine, combined = combination.channel_combine, []
    monkeypatch.setattr(combination, "channel_combine", lambda inputs, scales, shift, relu: combined.append(
        relu) or combine(inputs, scales, shift, relu))
    moments = []
    monkeypatch.setattr(SharedProducts, "moments", lambda self: moments.append(1) or _MOMENTS(self))
    a, b = test_interpolate.pair(TransformsItsInput, torch.float64)
    a.train(), b.train()
    coords = torch.linspace(0, 1, 6)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = mlifast.interpolate(a, mlifast.Line(a, b), coords)
        fast.points_per_group = 2
        fast(x)
        combined.clear()
        out = fast(x)
    for k, expected in enumerate(test_interpolate.oracle_outputs(a, fast.space, fast.coords[:, 0], x)):
        assert test_interpolate.rel_err(out[k], expected) < 1e-9, k
    assert combined == [False] * 3 and moments == []
