"""The 2D slice of the paper's Figure 1: the plane through θ0, a second initialisation θ0′
and the trained θT, with the straight segments and the projected training trajectory.

Coordinates (a, b): θ(a, b) = θ0 + a·(θT − θ0) + b·v, where v is θ0′ − θ0 made orthogonal
to θT − θ0 (Gram–Schmidt over the parameters; batch-norm running statistics follow the
same formula but do not enter the inner products, as in the paper). So θ0 = (0, 0),
θT = (1, 0) and θ0′ = (c, 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from mlifast.analysis.mli import default_distance_include
from mlifast.engine import Results
from mlifast.spaces import Plane, read_state


def _dot(x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> float:
    return sum((x[k].double() * y[k].double()).sum().item() for k in x if default_distance_include(k))


def _difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: a[k] - b[k] for k in b if b[k].is_floating_point()}


def slice_plane(init, second_init, end) -> tuple[Plane, tuple[float, float]]:
    """The plane of the slice and the coordinates (c, 1) of the second initialisation."""
    theta0, theta0b, theta_t = (read_state(s, role) for s, role in
                                ((init, "init"), (second_init, "second init"), (end, "end")))
    u = _difference(theta_t, theta0)
    w = _difference(theta0b, theta0)
    uu = _dot(u, u)
    if uu == 0:
        raise ValueError("surface: the trained weights equal the initialisation; nothing to slice")
    c = _dot(w, u) / uu
    v = {k: w[k] - c * u[k] for k in u}
    if _dot(v, v) == 0:
        raise ValueError("surface: the second initialisation lies on the line θ0 → θT; pick another")
    return Plane(theta0, u, v), (c, 1.0)


def project(plane: Plane, state) -> tuple[float, float]:
    """Least-squares coordinates (a, b) of a state in the plane's basis (parameters only)."""
    origin = plane.origin
    moved = _difference(read_state(state, "checkpoint"), origin)
    u = {k: plane.direction(k)[0] for k in moved}
    v = {k: plane.direction(k)[1] for k in moved}
    gram = torch.tensor([[_dot(u, u), _dot(u, v)], [_dot(v, u), _dot(v, v)]], dtype=torch.float64)
    rhs = torch.tensor([_dot(moved, u), _dot(moved, v)], dtype=torch.float64)
    a, b = torch.linalg.solve(gram, rhs).tolist()
    return a, b


def grid(low: float, high: float, steps: int) -> Tensor:
    """(steps², 2) coordinates, the first varying slowest."""
    axis = torch.linspace(low, high, steps, dtype=torch.float64)
    return torch.cartesian_prod(axis, axis)


def plot_surface(res: Results, second_init: tuple[float, float], path: Path, key: str = "loss",
                 trajectory: Optional[Sequence[tuple[float, float]]] = None, max_level: float = 3.0) -> None:
    """Contours of `key` over the grid, θ0, θ0′, θT, both segments to θT and the trajectory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlifast.engine.plotting import plane_grid

    a, b, placed = plane_grid(res.coords, res[key])
    values = placed.clamp(max=max_level).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    contour = ax.contourf(a.numpy(), b.numpy(), values, levels=torch.linspace(0, max_level, 31).numpy(),
                          cmap="viridis")
    fig.colorbar(contour, ax=ax, label=f"{key} (clipped at {max_level:g})")
    c = second_init
    ax.plot([0, 1], [0, 0], "r-", lw=2, label="θ0 → θT")
    ax.plot([c[0], 1], [c[1], 0], "b-", lw=2, label="θ0′ → θT")
    if trajectory:
        ax.plot(*zip(*trajectory), "o-", color="orange", ms=3, label="training trajectory")
    for (x, y), name in (((0, 0), "θ0"), (c, "θ0′"), ((1, 0), "θT")):
        ax.plot(x, y, "k*", ms=10)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), color="white")
    ax.set(xlabel="a (along θT − θ0)", ylabel="b (θ0′, orthogonalised)", title=f"{key} on the plane θ0, θ0′, θT")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
