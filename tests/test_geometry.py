"""Gauss length and logit linearity: exact values and the one-point-at-a-time oracle."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

import mlifast
from mlifast.analysis.geometry import gauss_length, logit_linearity
from models import mlp
from oracle import load_point


class Arc(nn.Module):
    """z(α) = [sin(θ + x), cos(θ + x)]: a circular arc of angle θ1 − θ0 per example."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta), dtype=torch.float64))

    def forward(self, x):
        return torch.stack([torch.sin(self.theta + x), torch.cos(self.theta + x)], -1)


def test_half_circle_has_gauss_length_pi():
    x = torch.rand(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    line = mlifast.Line(Arc(0.0), Arc(math.pi))
    assert abs(gauss_length(Arc(0.0), line, [(x, x)], alphas=200) - math.pi) < 1e-4


def test_the_alpha_grid_may_come_in_any_order():
    x = torch.rand(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    line = mlifast.Line(Arc(0.0), Arc(math.pi))
    grid = torch.linspace(0, 1, 200, dtype=torch.float64)
    shuffled = grid[torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    for alphas in (grid.flip(0), shuffled):
        assert abs(gauss_length(Arc(0.0), line, [(x, x)], alphas=alphas) - math.pi) < 1e-4


def test_an_output_at_rest_adds_no_length():
    class Scaled(nn.Module):  # z = x·[sin θ, cos θ]: at rest for x = 0, an arc of angle π otherwise
        def __init__(self, theta):
            super().__init__()
            self.theta = nn.Parameter(torch.tensor(float(theta), dtype=torch.float64))

        def forward(self, x):
            return x[:, None] * torch.stack([torch.sin(self.theta), torch.cos(self.theta)])

    line = mlifast.Line(Scaled(0.0), Scaled(math.pi))
    x = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    assert abs(gauss_length(Scaled(0.0), line, [(x, x)], alphas=200) - 3 * math.pi / 4) < 1e-4


def test_straight_output_paths_have_zero_length_and_linearity():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4).double(), nn.Linear(3, 4).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    assert gauss_length(a, mlifast.Line(a, b), [(x, x)], alphas=20) < 1e-12
    assert logit_linearity(a, mlifast.Line(a, b), [(x, x)], alphas=20) < 1e-20


def oracle_gauss_length(model, line, x, alphas):
    """Per α: nested jvp of functional_call at θ(α) along the line's direction."""
    names = [n for n, _ in model.named_parameters()]
    origin = {n: line.origin[n] for n in names}
    direction = {n: line.direction(n)[0] for n in names}
    values = []
    for a in alphas.tolist():
        def z(t):
            return functional_call(model, {n: origin[n] + t * direction[n] for n in names}, (x,)).flatten(1)

        def dz(t):
            return jvp(z, (t,), (torch.ones_like(t),))[1]

        t = torch.tensor(a, dtype=torch.float64)
        v, acc = jvp(dz, (t,), (torch.ones_like(t),))
        n = v / v.norm(dim=1, keepdim=True)
        values.append((acc - n * (n * acc).sum(1, keepdim=True)).norm(dim=1) / v.norm(dim=1))
    return torch.trapezoid(torch.stack(values), alphas, dim=0).mean().item()


def test_mlp_matches_per_point_oracle():
    torch.manual_seed(0)
    a, b = mlp().double().eval(), mlp().double().eval()
    line = mlifast.Line(a, b)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    data = [(x[:4], None), (x[4:], None)]
    alphas = torch.linspace(0, 1, 9, dtype=torch.float64)
    got = gauss_length(a, line, data, alphas=alphas)
    assert got > 0.01
    assert math.isclose(got, oracle_gauss_length(a, line, x, alphas), rel_tol=1e-9)


def test_logit_linearity_matches_loop():
    torch.manual_seed(0)
    a, b = mlp().double().eval(), mlp().double().eval()
    line = mlifast.Line(a, b)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    alphas = torch.linspace(0, 1, 7, dtype=torch.float64)
    z = torch.stack([load_point(a, line, t)(x) for t in alphas.tolist()])
    chord = (z[-1] - z[0]) / (z[-1] - z[0]).norm(dim=-1, keepdim=True)
    r = (z - z[0]) - chord * ((z - z[0]) * chord).sum(-1, keepdim=True)
    expected = torch.trapezoid(r.pow(2).sum(-1).mean(1), alphas).item()
    assert math.isclose(logit_linearity(a, line, [(x, None)], alphas=alphas), expected, rel_tol=1e-9)


def test_a_model_falling_back_to_one_point_at_a_time_refuses_derivatives_along_alpha():
    """The fallback runs each point at its coordinates as numbers: no derivative along α
    reaches it (gauss_length would measure a path at rest). logit_linearity, which reads
    the outputs alone, takes it and agrees with the loop."""
    torch.manual_seed(0)
    a, b = mlp().double().eval(), mlp().double().eval()
    for m in (a, b):  # (a hook on a layer: the multi-point rules do not follow it, the check falls back)
        m[1].register_forward_hook(lambda module, args, out: out * 2)
    line, x = mlifast.Line(a, b), torch.randn(4, 3, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="disagrees with the model"), \
            pytest.raises(NotImplementedError, match="cannot carry derivatives along the coordinates"):
        gauss_length(a, line, [(x, None)], alphas=5)
    alphas = torch.linspace(0, 1, 5, dtype=torch.float64)
    z = torch.stack([load_point(a, line, t)(x) for t in alphas.tolist()])
    chord = (z[-1] - z[0]) / (z[-1] - z[0]).norm(dim=-1, keepdim=True)
    r = (z - z[0]) - chord * ((z - z[0]) * chord).sum(-1, keepdim=True)
    expected = torch.trapezoid(r.pow(2).sum(-1).mean(1), alphas).item()
    with pytest.warns(RuntimeWarning, match="disagrees with the model"):
        assert math.isclose(logit_linearity(a, line, [(x, None)], alphas=alphas), expected, rel_tol=1e-9)


@pytest.mark.parametrize("measure", [gauss_length, logit_linearity])
def test_sequence_first_outputs_average_over_their_examples(measure):
    """batch_dim=1: the same examples as batch-first give the same mean over examples."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()  # noqa: E731
    a, b = make(), make()
    line, x = mlifast.Line(a, b), torch.randn(2, 5, 3, dtype=torch.float64)  # (T, B, 3)
    seq_first = measure(a, line, [(x, None)], alphas=11, batch_dim=1)
    batch_first = measure(a, line, [(x.transpose(0, 1).contiguous(), None)], alphas=11)
    assert math.isclose(seq_first, batch_first, rel_tol=1e-12)


def test_logit_linearity_reads_a_float32_grids_ends_and_an_output_that_does_not_move():
    """A float32 grid's 0 is −3e-8 (as on_segment reads it); an output whose chord is 0 is
    off it all along (here it does not move at all: 0, not 0/0)."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # noqa: E731
    a, b = make(), make()
    x = torch.randn(5, 3, dtype=torch.float64)
    grid32 = torch.linspace(-0.3, 1.3, 17)
    assert 0.0 not in grid32.tolist()
    got = logit_linearity(a, mlifast.Line(a, b), [(x, None)], alphas=grid32)
    exact = logit_linearity(a, mlifast.Line(a, b), [(x, None)], alphas=grid32.double().round(decimals=6))
    assert math.isclose(got, exact, rel_tol=1e-6) and got > 1e-3
    assert logit_linearity(a, mlifast.Line(a, a), [(x, None)], alphas=5) == 0.0


def test_needs_a_line():
    torch.manual_seed(0)
    models = [mlp() for _ in range(3)]
    with pytest.raises(ValueError, match="needs a line"):
        gauss_length(models[0], mlifast.Plane.through(*models), [(torch.randn(2, 3, 4), None)])


def test_gauss_length_over_batches_with_a_moving_norm():
    """A norm's weight moving: its per-point view is made inside each batch's forward-mode
    pass (kept from the first one, the second batch raised)."""
    torch.manual_seed(0)
    factory = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Flatten(),  # noqa: E731
                                    nn.Linear(8 * 36, 5))
    a, b = factory().double(), factory().double()
    with torch.no_grad():
        b[1].weight.add_(0.5)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    line = mlifast.Line(a, b)
    whole = gauss_length(a, line, [(x, None)], alphas=5)
    assert gauss_length(a, line, [(x[:4], None), (x[4:], None)], alphas=5) == pytest.approx(whole, rel=1e-12)

