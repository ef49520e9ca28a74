"""Tests of the spaces layer: Span / Line / Plane and random directions."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlifast.spaces import Line, Plane, Span, random_direction


def _net(seed: int) -> nn.Module:
    """Linear -> BatchNorm1d -> Linear, with distinct non-default BN buffers."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_()
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(10 + seed)
    return net


def _conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3)
    )


@pytest.fixture
def nets():
    return _net(0), _net(1)


# ----------------------------------------------------------------------------- Line


def test_line_state_at_matches_hand_formula(nets):
    a, b = nets
    line = Line(a, b)
    sa, sb = a.state_dict(), b.state_dict()
    for alpha in (0.3, -0.5, 1.7):
        st_ = line.state_at(alpha)
        assert list(st_) == list(sa)
        for k, t in st_.items():
            if k.endswith("num_batches_tracked"):
                assert t.dtype == torch.int64
                assert t.item() == sa[k].item() == 10  # from start, never end's 11
            else:
                torch.testing.assert_close(t, sa[k] + alpha * (sb[k] - sa[k]))
    assert "1.num_batches_tracked" not in line.floating_keys
    assert "1.running_var" in line.floating_keys


def test_line_endpoints(nets):
    a, b = nets
    line = Line(a.state_dict(), b.state_dict())
    s0, s1 = line.state_at(0), line.state_at(1.0)
    for k, t in a.state_dict().items():
        assert torch.equal(s0[k], t)
    for k, t in b.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(s1[k], a.state_dict()[k])
        else:
            torch.testing.assert_close(s1[k], t, rtol=0, atol=1e-6)


def test_line_direction_is_difference_in_own_dtype():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    b = {"w": torch.tensor([1.5, -2.0], dtype=torch.float16)}
    line = Line(a, b)
    d = line.direction("w")
    assert d.shape == (1, 2) and d.dtype == torch.float16
    assert torch.equal(d[0], b["w"] - a["w"])
    assert line.num_directions == 1
    assert torch.equal(line.start["w"], a["w"])


def test_line_module_and_state_dict_agree(nets):
    a, b = nets
    x = Line(a, b).state_at(0.25)
    y = Line(a.state_dict(), b.state_dict()).state_at(0.25)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_line_is_independent_of_later_mutation(nets):
    a, b = nets
    line = Line(a, b)
    before = {k: v.clone() for k, v in line.state_at(0.5).items()}
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            p.add_(1.0)
        a[1].running_mean.add_(3.0)
        a[1].num_batches_tracked.add_(5)
    after = line.state_at(0.5)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert line.origin["1.num_batches_tracked"].item() == 10


def test_returned_state_is_a_copy(nets):
    line = Line(*nets)
    s = line.state_at(0.0)
    s["0.weight"].add_(1.0)
    s["1.num_batches_tracked"].add_(1)
    assert torch.equal(line.state_at(0.0)["0.weight"], nets[0].state_dict()["0.weight"])
    assert line.origin["1.num_batches_tracked"].item() == 10


# ----------------------------------------------------------------------------- Plane, Span


def test_plane_through_corners():
    p0, p1, p2 = _net(0), _net(1), _net(2)
    plane = Plane.through(p0, p1, p2)
    assert plane.num_directions == 2
    for coord, ref in (((0, 0), p0), ((1, 0), p1), ((0, 1), p2)):
        s = plane.state_at(coord)
        for k, t in ref.state_dict().items():
            if k.endswith("num_batches_tracked"):
                assert torch.equal(s[k], p0.state_dict()[k])
            else:
                torch.testing.assert_close(s[k], t, rtol=0, atol=1e-6)
    # midpoint of p1 and p2
    s = plane.state_at(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(
        s["0.weight"], (p1.state_dict()["0.weight"] + p2.state_dict()["0.weight"]) / 2
    )


def test_plane_from_directions_formula(nets):
    o = nets[0].state_dict()
    u = random_direction(o, seed=1, ignore=None)
    v = random_direction(o, seed=2, ignore=None)
    plane = Plane(o, u, v)
    s = plane.state_at([0.5, -2.0])
    for k in plane.floating_keys:
        torch.testing.assert_close(s[k], o[k] + 0.5 * u[k] - 2.0 * v[k])
    assert torch.equal(plane.direction("0.weight")[1], v["0.weight"])


def test_span_three_directions_formula(nets):
    o = nets[0]
    ds = [random_direction(o, seed=s, ignore=None) for s in (3, 4, 5)]
    span = Span(o, ds)
    c = [0.1, -0.2, 0.7]
    s = span.state_at(c)
    ref = o.state_dict()
    for k in span.floating_keys:
        torch.testing.assert_close(s[k], ref[k] + sum(cj * d[k] for cj, d in zip(c, ds)))
    assert span.direction("3.weight").shape == (3, 2, 4)
    assert span.keys == tuple(ref)


def test_state_at_rejects_wrong_coord_shape(nets):
    line, plane = Line(*nets), Plane.through(nets[0], nets[1], _net(2))
    with pytest.raises(ValueError, match="sequence of 2"):
        plane.state_at(0.5)
    with pytest.raises(ValueError, match="J=1"):
        line.state_at([0.1, 0.2])
    with pytest.raises(ValueError, match="not finite"):
        line.state_at(float("nan"))
    for plain in ([float("inf")], (0.5, float("nan"))):  # (lists of floats: checked without a tensor)
        with pytest.raises(ValueError, match="not finite"):
            (line if len(plain) == 1 else plane).state_at(plain)
    with pytest.raises(ValueError, match="beyond float64's range"):
        line.state_at([10 ** 400])
    assert torch.equal(plane.state_at((1, 0.5))["3.weight"], plane.state_at(torch.tensor([1.0, 0.5]))["3.weight"])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=2, max_size=2))
def test_plane_state_at_is_affine(c):
    o = {"w": torch.arange(6.0, dtype=torch.float64).reshape(2, 3), "n": torch.tensor(7)}
    u = {"w": torch.ones(2, 3, dtype=torch.float64)}
    v = {"w": torch.eye(2, 3, dtype=torch.float64)}
    s = Plane(o, u, v).state_at(c)
    torch.testing.assert_close(s["w"], o["w"] + c[0] * u["w"] + c[1] * v["w"])
    assert s["n"].item() == 7


# ----------------------------------------------------------------------------- coords


def test_coords_tensor_line(nets):
    line = Line(*nets)
    c = line.coords_tensor(5)
    assert c.dtype == torch.float64 and c.shape == (5, 1)
    assert torch.equal(c[:, 0], torch.linspace(0, 1, 5, dtype=torch.float64))
    assert line.coords_tensor([0.0, 0.5]).tolist() == [[0.0], [0.5]]
    assert line.coords_tensor(torch.tensor([[0.25], [2.0]])).tolist() == [[0.25], [2.0]]
    assert line.coords_tensor(1).tolist() == [[0.0]]
    assert torch.equal(line.coords_tensor(torch.tensor(3)), line.coords_tensor(3))
    for bad in ([[0.1, 0.2]], 0, 0.5, [], True, [[[0.0]]]):
        with pytest.raises(ValueError):
            line.coords_tensor(bad)
    with pytest.raises(ValueError, match=r"\(K,\) or \(K, 1\)"):
        line.coords_tensor([[0.1, 0.2]])


def test_an_entry_integer_at_one_end_and_floating_at_the_other_is_refused():
    start = {"w": torch.zeros(3), "steps": torch.tensor([1, 2])}
    end = {"w": torch.ones(3), "steps": torch.tensor([1.5, 2.5])}  # (the start's integers would be kept)
    for a, b in ((start, end), (end, start)):
        with pytest.raises(ValueError, match="dtype mismatch: 'steps'"):
            Line(a, b)


def test_coords_tensor_reads_python_floats_in_float64(nets):
    # (not through float32: 0.1 would become 0.10000000149…, a float64 model's point moved)
    assert Line(*nets).coords_tensor([0.1, 0.3]).flatten().tolist() == [0.1, 0.3]


def test_coords_carrying_derivatives_are_refused(nets):
    line = Line(*nets)
    with pytest.raises(ValueError, match="coords carry derivatives"):
        line.coords_tensor(torch.tensor([0.0, 1.0], requires_grad=True))
    with pytest.raises(ValueError, match="coords carry derivatives"):
        torch.func.jvp(lambda c: line.coords_tensor(c).sum(), (torch.zeros(2),), (torch.ones(2),))


def test_coords_beyond_the_space_dtype_are_refused(nets):
    line = Line(*nets)  # float32
    with pytest.raises(ValueError, match="beyond what this space's torch.float32"):
        line.coords_tensor([0.0, 1e300])
    assert Line(*(n.double() for n in nets)).coords_tensor([1e300]).item() == 1e300


def test_coords_tensor_plane_grid_and_errors(nets):
    plane = Plane.through(nets[0], nets[1], _net(2))
    c = plane.coords_tensor(3)
    assert c.shape == (9, 2) and c.dtype == torch.float64
    assert c[:4].tolist() == [[0.0, 0.0], [0.0, 0.5], [0.0, 1.0], [0.5, 0.0]]  # first slowest
    pts = [[0.0, 1.0], [2.0, -1.0]]
    assert plane.coords_tensor(pts).tolist() == pts
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        plane.coords_tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        plane.coords_tensor(torch.zeros(4, 3))
    span3 = Span(nets[0], [random_direction(nets[0], seed=s) for s in range(3)])
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        span3.coords_tensor(4)


# ----------------------------------------------------------------------------- validation


def test_missing_key_is_named(nets):
    end = nets[1].state_dict()
    del end["3.bias"]
    with pytest.raises(ValueError, match=r"missing.*'3\.bias'"):
        Line(nets[0], end)


def test_direction_missing_running_stat_is_named(nets):
    d = random_direction(nets[0], seed=0)
    del d["1.running_var"]
    with pytest.raises(ValueError, match=r"'1\.running_var'.*\n.*zeros_like"):
        Span(nets[0], [d])


def test_unexpected_key_is_named(nets):
    end = dict(nets[1].state_dict())
    end["extra.weight"] = torch.zeros(2)
    end["extra.count"] = torch.tensor(3)  # non-floating extras are ignored
    with pytest.raises(ValueError, match=r"(?m)lacks: 'extra\.weight'$") as e:
        Line(nets[0], end)
    assert "extra.count" not in str(e.value)


def test_non_floating_entries_not_required_in_direction(nets):
    d = random_direction(nets[0], seed=0)
    assert "1.num_batches_tracked" not in d
    span = Span(nets[0], [d])
    assert span.state_at([0.5])["1.num_batches_tracked"].item() == 10


def test_shape_mismatch_names_key_and_shapes(nets):
    end = dict(nets[1].state_dict())
    end["0.weight"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"'0\.weight' \(start \(4, 3\), end \(3, 4\)\)"):
        Line(nets[0], end)


def test_dtype_mismatch(nets):
    with pytest.raises(ValueError, match=r"dtype mismatch: '0\.weight'.*float64"):
        Line(nets[0], nets[1].double())


def test_device_mismatch():
    a = {"w": torch.zeros(2, 2)}
    b = {"w": torch.zeros(2, 2, device="meta")}
    with pytest.raises(ValueError, match=r"device mismatch: 'w'.*meta"):
        Line(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_named(nets, bad):
    end = dict(nets[1].state_dict())
    end["3.weight"] = end["3.weight"].clone()
    end["3.weight"][0, 0] = bad
    with pytest.raises(ValueError, match=r"end has non-finite.*'3\.weight'"):
        Line(nets[0], end)
    with pytest.raises(ValueError, match=r"start has non-finite.*'3\.weight'"):
        Line(end, nets[0])
    with pytest.raises(ValueError, match=r"directions\[0\] has non-finite.*'3\.weight'"):
        Span(nets[0], [{k: v for k, v in end.items()}])


def test_infinities_the_same_at_every_point_are_kept():
    """An attention mask's −inf, equal at both ends, is a constant of the space."""
    mask = torch.triu(torch.full((3, 3), float("-inf")), 1)
    a, b = {"w": torch.zeros(2), "mask": mask}, {"w": torch.ones(2), "mask": mask.clone()}
    line = Line(a, b)
    assert line.is_frozen("mask")
    for alpha in (-0.5, 0.3, 2.0):
        assert torch.equal(line.state_at(alpha)["mask"], mask)
    plane = Plane.through(a, b, {"w": torch.full((2,), 2.0), "mask": mask.clone()})
    assert torch.equal(plane.state_at([0.4, -1.0])["mask"], mask)
    Span(a, [{"w": torch.ones(2), "mask": torch.zeros(3, 3)}])  # (a direction of 0 where the origin is −inf)


@pytest.mark.parametrize("end_mask", ["finite there", "nan at both", "+inf"])
def test_infinities_where_the_points_differ_are_named(end_mask):
    mask = torch.triu(torch.full((3, 3), float("-inf")), 1)
    other = {"finite there": torch.zeros(3, 3), "nan at both": None, "+inf": -mask}[end_mask]
    a = {"w": torch.zeros(2), "mask": mask if other is not None else torch.full((3, 3), float("nan"))}
    b = {"w": torch.ones(2), "mask": other if other is not None else torch.full((3, 3), float("nan"))}
    with pytest.raises(ValueError, match=r"non-finite.*'mask'.*same value"):
        Line(a, b)
    with pytest.raises(ValueError, match=r"origin has non-finite.*'mask' where the points differ"):
        Span({"w": torch.zeros(2), "mask": mask}, [{"w": torch.ones(2), "mask": torch.ones(3, 3)}])


def test_difference_overflow_detected():
    a = {"w": torch.tensor([-60000.0], dtype=torch.float16)}
    b = {"w": torch.tensor([60000.0], dtype=torch.float16)}
    with pytest.raises(ValueError, match="overflow"):
        Line(a, b)


def test_many_missing_keys_are_truncated():
    start = {f"k{i}": torch.zeros(1) for i in range(15)}
    with pytest.raises(ValueError, match=r"'k9' and 5 more") as e:
        Line(start, {})
    assert "'k10'" not in str(e.value)


def test_type_errors(nets):
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        Line([1, 2], nets[1])
    with pytest.raises(TypeError, match="'bad'"):
        Line(nets[0], {**nets[1].state_dict(), "bad": 3.0})
    with pytest.raises(TypeError, match=r"\[d\]"):
        Span(nets[0], nets[1].state_dict())
    with pytest.raises(ValueError, match="empty"):
        Span(nets[0], [])


# ----------------------------------------------------------------------------- frozen, to, describe


def test_frozen_detection(nets):
    a, b = nets
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight)
        b[0].bias.copy_(a[0].bias)
    line = Line(a, b)
    assert line.is_frozen("0.weight") and line.is_frozen("0.bias")
    assert not line.is_frozen("3.weight") and not line.is_frozen("1.running_mean")
    assert line.is_frozen("1.num_batches_tracked")  # constant, from the origin
    with pytest.raises(KeyError):
        line.direction("1.num_batches_tracked")
    with pytest.raises(KeyError):
        line.direction("nope")
    with pytest.raises(KeyError):
        line.is_frozen("nope")
    assert line.describe()["num_frozen_tensors"] == 2


def test_to_float64(nets):
    line = Line(*nets)
    l64 = line.to(dtype=torch.float64)
    assert type(l64) is Line
    assert l64.origin["0.weight"].dtype == torch.float64
    assert l64.direction("0.weight").dtype == torch.float64
    assert l64.origin["1.num_batches_tracked"].dtype == torch.int64
    assert line.origin["0.weight"].dtype == torch.float32  # original untouched
    s32, s64 = line.state_at(0.7), l64.state_at(0.7)
    for k in s32:
        torch.testing.assert_close(s64[k].float(), s32[k].float(), rtol=1e-6, atol=1e-6)
    assert l64.describe()["dtypes"] == {"torch.float64": 8, "torch.int64": 1}
    with pytest.raises(ValueError):
        line.to(dtype=torch.int32)


def test_describe_is_json(nets):
    a, b = nets
    info = json.loads(json.dumps(Line(a, b).describe()))
    assert info["kind"] == "line" and info["J"] == 1
    assert info["num_tensors"] == 9 and info["num_floating_tensors"] == 8
    assert info["num_floating_elements"] == sum(
        t.numel() for t in a.state_dict().values() if t.is_floating_point()
    )
    assert info["built"]["method"] == "Line(start, end)"
    dist = torch.sqrt(sum(((b.state_dict()[k] - t) ** 2).sum() for k, t in a.state_dict().items()
                          if t.is_floating_point()))
    assert info["direction_norms"][0] == pytest.approx(float(dist), rel=1e-5)
    p = json.loads(json.dumps(Plane.through(a, b, _net(2)).describe()))
    assert p["kind"] == "plane" and p["J"] == 2 and p["built"]["method"].startswith("Plane.through")
    s = json.loads(json.dumps(Span(a, [random_direction(a, seed=0)]).describe()))
    assert s["kind"] == "span"


# ----------------------------------------------------------------------------- random_direction


def test_random_direction_reproducible_and_independent_of_global_rng():
    net = _conv_net(0)
    torch.manual_seed(123)
    d1 = random_direction(net, seed=7)
    torch.manual_seed(456)
    torch.randn(10)
    d2 = random_direction(net, seed=7)
    d3 = random_direction(net, seed=8)
    assert list(d1) == [k for k, t in net.state_dict().items() if t.is_floating_point()]
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert not torch.equal(d1["0.weight"], d3["0.weight"])
    g = torch.Generator().manual_seed(7)
    d4 = random_direction(net, seed=None, generator=g)
    assert all(torch.equal(d1[k], d4[k]) for k in d1)


def test_random_direction_filter_norms():
    net = _conv_net(1)
    d = random_direction(net, seed=0)
    for name in ("0.weight", "4.weight"):
        w = net.state_dict()[name]
        assert d[name].shape == w.shape and d[name].dtype == w.dtype
        dn = d[name].reshape(w.shape[0], -1).norm(dim=1)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(dn, wn, rtol=1e-5, atol=0)
    # zeros for biases and all of BN (affine params and running stats)
    for name in ("0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "4.bias"):
        assert not d[name].any(), name


def test_random_direction_ignore_none_and_raw():
    net = _net(3)
    d = random_direction(net, seed=0, ignore=None)
    for name in ("0.bias", "1.weight", "1.bias", "3.bias"):
        w = net.state_dict()[name]
        torch.testing.assert_close(d[name].norm(), w.norm(), rtol=1e-5, atol=0)
    assert not d["1.running_mean"].any() and not d["1.running_var"].any()
    # the weight's direction does not depend on ignore
    assert torch.equal(d["0.weight"], random_direction(net, seed=0)["0.weight"])
    raw = random_direction(net, seed=0, normalization=None)
    w = net.state_dict()["0.weight"]
    assert not torch.allclose(raw["0.weight"].norm(dim=1), w.norm(dim=1), rtol=1e-3)
    assert not raw["0.bias"].any()


def test_random_direction_state_dict_buffers_by_name():
    sd = dict(_net(4).state_dict())
    sd["extra_scale"] = torch.tensor([2.0, 3.0])  # floating, 1-D, not a running stat
    d = random_direction(sd, seed=0, ignore=None)
    assert not d["1.running_var"].any()
    torch.testing.assert_close(d["extra_scale"].norm(), sd["extra_scale"].norm())


def test_random_direction_tied_weights_share_direction():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

    d = random_direction(Tied(), seed=0)
    assert torch.equal(d["a.weight"], d["b.weight"]) and d["a.weight"].any()


def test_random_direction_argument_errors():
    net = _net(0)
    with pytest.raises(ValueError):
        random_direction(net, seed=0, normalization="layer")
    with pytest.raises(ValueError):
        random_direction(net, seed=0, ignore="bias")
    with pytest.raises(ValueError):
        random_direction(net, seed=None)
    with pytest.raises(ValueError):
        random_direction(net, seed=1, generator=torch.Generator())


def test_state_at_fresh_equals_written_into_out():
    """state_at's fresh form (foreach sums for contiguous entries) gives, bit for bit, what
    writing into `out` gives (one op per tensor), layouts and constant entries included."""
    g = torch.Generator().manual_seed(5)

    def state():
        return {"w": torch.randn(6, 5, generator=g), "img": torch.randn(2, 3, 4, 4, generator=g).contiguous(
            memory_format=torch.channels_last), "b": torch.randn(6, generator=g, dtype=torch.float64),
                "steps": torch.tensor(7)}

    origin = state()
    span = Span(origin, [state(), state()])
    c = [0.3, -1.7]
    fresh = span.state_at(c)
    written = span.state_at(c, out=span.state_at([2.0, 0.5]))
    assert list(fresh) == list(origin)
    for k, t in fresh.items():
        assert torch.equal(t, written[k]) and t.stride() == origin[k].stride() and t.dtype == origin[k].dtype, k
        assert t.data_ptr() != origin[k].data_ptr(), k  # (new memory, constants too)
    expected = origin["w"] + c[0] * span.direction("w")[0]
    torch.testing.assert_close(fresh["w"], expected + c[1] * span.direction("w")[1], rtol=0, atol=1e-6)


def test_state_at_some_keys_gives_those_entries_of_the_whole_state():
    g = torch.Generator().manual_seed(6)

    def state():
        return {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g), "steps": torch.tensor(7)}

    span = Span(state(), [state()])
    whole = span.state_at([0.4])
    for keys in (["b"], ["steps", "w"], []):
        part = span.state_at([0.4], keys=keys)
        assert list(part) == keys and all(torch.equal(part[k], whole[k]) for k in keys)
    kept = span.state_at([0.9], keys=["w"])
    written = span.state_at([0.4], out=kept, keys=["w", "b"])
    assert written["w"].data_ptr() == kept["w"].data_ptr() and torch.equal(written["w"], whole["w"])
    with pytest.raises(KeyError, match="'v'"):
        span.state_at([0.4], keys=["w", "v"])


def test_pickle_after_state_at_carries_no_views():
    """The views state_at keeps of the directions are not pickled (each would carry its
    whole stack of directions): the same bytes before and after a state_at."""
    import pickle

    g = torch.Generator().manual_seed(2)
    span = Span({"w": torch.randn(50, 50, generator=g)}, [{"w": torch.randn(50, 50, generator=g)} for _ in range(2)])
    before = len(pickle.dumps(span))
    span.state_at([0.1, 0.2])
    assert len(pickle.dumps(span)) == before
    again = pickle.loads(pickle.dumps(span))
    assert torch.equal(again.state_at([0.1, 0.2])["w"], span.state_at([0.1, 0.2])["w"])
