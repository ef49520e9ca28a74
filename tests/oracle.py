"""The one-point-at-a-time oracle every multi-point result is checked against."""
import copy

import torch


def load_point(model, space, coord):
    """A copy of `model` holding `space.state_at(coord)`, in the model's training mode."""
    m = copy.deepcopy(model)
    m.load_state_dict(space.state_at(coord))
    return m


def point_coord(coords, k):
    c = coords[k]
    return c.item() if c.dim() == 0 else c.tolist()


def oracle_outputs(model, space, coords, *args, **kwargs):
    """[model at coords[k] (copies of args) for each k]."""
    fresh = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return [load_point(model, space, point_coord(coords, k))(*map(fresh, args),
                                                             **{n: fresh(v) for n, v in kwargs.items()})
            for k in range(len(coords))]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
