"""A module's own moving tensors used as glue (a ViT's class token and position embedding,
a LayerScale) run once for all points (PointValues), against the one-point oracle; what
PointValues refuses runs point by point, with the same results."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlifast
from mlifast.multipoint.generic import GenericRule
from models import randomize_bn
from oracle import oracle_outputs, rel_err
from test_evaluate import assert_matches_the_loop


class CountsCalls(nn.Module):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return self.glue(x)


class TinyViT(CountsCalls):
    """timm's layout: class token and position embedding on the top module."""

    def __init__(self, dim=8, tokens=5):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def glue(self, x):  # x: (B, tokens, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.fc(x)], dim=1) + self.pos
        return self.head(self.norm(x).mean(1))


class EveryOperation(CountsCalls):
    """Each operation PointValues computes, both ways round, in place, and on its own."""

    def __init__(self, dim=6):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, dim))
        self.scale = nn.Parameter(torch.rand(()) + 1.0)
        self.fc = nn.Linear(dim, dim)

    def glue(self, x):  # x: (B, 4, dim)
        h = self.fc(x)
        h = self.gamma * h + h * (2.0 * self.gamma - 1)
        h = (h - self.shift) / (self.scale + 0.5) - (self.shift - h) * self.scale
        h = torch.add(h, self.gamma * self.shift)
        h += self.shift
        h.mul_(self.gamma)
        return torch.div(h, self.gamma + 3.0)


class RefusedGlue(CountsCalls):
    """Its own tensors used where PointValues refuses: a function of it, and F.linear."""

    def __init__(self, dim=6):
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(dim) * 0.1)
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)

    def glue(self, x):
        return F.linear(x * self.log_scale.exp(), self.weight)


def pair(factory, seed=0):
    torch.manual_seed(seed)
    a = randomize_bn(factory(), seed).double().eval()
    torch.manual_seed(seed + 1)
    b = randomize_bn(factory(), seed + 1).double().eval()
    return a, b


def generic_rules(fast):
    return [m for m in fast.model.modules() if type(m) is GenericRule]


@pytest.mark.parametrize("factory, shape", [(TinyViT, (3, 5, 8)), (EveryOperation, (3, 4, 6))])
def test_glue_runs_once_for_all_points(factory, shape):
    a, b = pair(factory)
    line, coords = mlifast.Line(a, b), torch.linspace(-0.25, 1.25, 5)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = oracle_outputs(a, line, coords, x)
    fast = mlifast.interpolate(a, line, coords)
    with torch.no_grad():
        out = fast(x)
        factory.calls = 0
        again = fast(x)
    for k, e in enumerate(expected):
        assert rel_err(out[k], e) < 1e-12, k
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert factory.calls == 1  # (once for all 5 points)
    assert all(rule.all_at_once for rule in generic_rules(fast))


def test_refused_glue_runs_point_by_point_with_the_same_results():
    a, b = pair(RefusedGlue)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 4)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = oracle_outputs(a, line, coords, x)
    fast = mlifast.interpolate(a, line, coords)
    with torch.no_grad():
        out = fast(x)
        RefusedGlue.calls = 0
        fast(x)
    for k, e in enumerate(expected):
        assert rel_err(out[k], e) < 1e-12, k
    assert [rule.all_at_once for rule in generic_rules(fast)] == [False]
    assert RefusedGlue.calls == len(coords)  # (point by point from the first refusal on)


class RefusedAfterBatchNorm(nn.Module):
    """A batch norm (child) runs before its parent's own tensor is refused, from the
    parent's `refuse_from`-th call on (the same function either way): the statistics the
    abandoned attempt gathered for bn="recompute" must not count."""

    def __init__(self, refuse_from):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.temperature = nn.Parameter(torch.rand(()) + 1.0)
        self.head = nn.Linear(4, 5)
        self.refuse_from, self.seen = refuse_from, 0

    def forward(self, x):
        self.seen += 1
        h = self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))
        return h * self.temperature.reciprocal() if self.seen >= self.refuse_from else h / self.temperature


@pytest.mark.parametrize("refuse_from", range(1, 7))
@pytest.mark.parametrize("bn", ["recompute", "batch"])
def test_a_refusal_after_batch_statistics_keeps_the_policy_exact(bn, refuse_from):
    a, b = pair(lambda: RefusedAfterBatchNorm(refuse_from))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g))
            for _ in range(3)]
    assert_matches_the_loop(a, b, data, bn)


def test_gradients_take_the_point_by_point_path():
    a, b = pair(TinyViT)
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 3)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    fast = mlifast.interpolate(a, line, coords)
    fast(x)
    TinyViT.calls = 0
    out = fast(x)
    assert TinyViT.calls == len(coords)  # (point by point: PointValues computes outside autograd)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    expected = oracle_outputs(a, line, coords, x2)
    for k, e in enumerate(expected):
        assert rel_err(out[k].detach(), e.detach()) < 1e-12
    sum(o.sum() for o in expected).backward()
    assert x2.grad.abs().max() > 0.01
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)


class OwnCode(nn.Module):
    """A module whose own code does `step` with its own tensors g (shape `g`) and a child fc."""

    def __init__(self, step, g=(6,)):
        super().__init__()
        self.step, self.fc = step, nn.Linear(6, 6)
        self.g = nn.Parameter(torch.randn(*g))

    def forward(self, x):
        return self.step(self, x)


HARD_CASES = {  # name: (step, shape of g, input shape); K = 4 points
    # the batch's rows mixed by the module's own code: all points' rows, run at once
    "batch_statistics": (lambda m, x: (x - x.mean(0)) / (x.var(0) + 1e-5).sqrt() * m.g, (6,), (3, 6)),
    "batch_sum": (lambda m, x: m.fc(x) + x.sum(0) * m.g, (6,), (3, 6)),
    "flip_batch": (lambda m, x: m.fc(x).flip(0) + m.g, (6,), (3, 6)),
    # a dimension of K·B = 12 that is not the batch
    "sequence_first_scale": (lambda m, x: (m.fc(x).transpose(0, 1) * m.g).transpose(0, 1), (6,), (3, 12, 6)),
    "sequence_first_in_place": (lambda m, x: m.fc(x).transpose(0, 1).mul_(m.g).transpose(0, 1), (6,), (3, 12, 6)),
    "sequence_first_bias": (lambda m, x: (m.fc(x).transpose(0, 1) + m.g).transpose(0, 1), (3, 6), (3, 12, 6)),
    "constant_of_k_b_rows": (lambda m, x: m.fc(x) + (m.g + torch.ones(12, 6, dtype=x.dtype)).sum(0), (6,), (3, 6)),
    # an activation without the batch in dim 0 (windows): K of it would be held
    "windows": (lambda m, x: (m.fc(x).reshape(-1, 2, 6) * m.g).reshape(x.shape[0], -1, 6), (6,), (3, 4, 6)),
}


@pytest.mark.parametrize("name", sorted(HARD_CASES))
def test_what_glue_cannot_see_is_caught_by_the_first_call_check(name):
    step, g, shape = HARD_CASES[name]
    a, b = pair(lambda: OwnCode(step, g))
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 4)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = oracle_outputs(a, line, coords, x)
    fast = mlifast.interpolate(a, line, coords)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no fallback of the whole model to one point at a time)
        with torch.no_grad():
            out = fast(x)
    for k, e in enumerate(expected):
        assert rel_err(out[k], e) < 1e-12, k


def test_all_at_once_with_dropout_active_once_checked_with_it_off():
    a, b = pair(lambda: nn.Sequential(TinyViT(), nn.Dropout(1e-12)))
    a.train()
    line, coords = mlifast.Line(a, b), torch.linspace(0, 1, 3)
    fast = mlifast.interpolate(a, line, coords)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        fast(x)  # (checked, dropout off)
        TinyViT.calls = 0
        out = fast(x)
    assert TinyViT.calls == 1 and not fast.per_point_fallback
    for k, e in enumerate(oracle_outputs(a, line, coords, x)):
        assert rel_err(out[k], e) < 1e-12, k


def test_refusals_happen_in_the_probe_of_one_point(monkeypatch):
    """evaluate's probe of activation sizes (one point) meets a module's refusal, not the
    first-call check's K-point call, which would run again for each refusing module."""
    from mlifast.multipoint import point_values

    refused_at = []
    refuse = point_values._refuse
    monkeypatch.setattr(point_values, "_refuse",
                        lambda owner, func: refused_at.append(owner.context.num_active) or refuse(owner, func))
    a, b = pair(lambda: nn.Sequential(RefusedGlue(), RefusedGlue(), nn.Linear(6, 3)))
    data = [(torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(2)]
    assert_matches_the_loop(a, b, data, "interpolate")
    assert refused_at == [1, 1]
