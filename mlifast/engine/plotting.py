"""Figures of a Results: curves against α for a line, contours for a plane grid."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import torch
from torch import Tensor

from mlifast.spaces import on_segment

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _mark_largest_rise(ax, alphas, losses) -> None:
    """Δ_min = max_{i<j} L_j − L_i over the points in [0, 1] (as `mli.report` takes it: MLI
    is a property of the segment θ0 → θT): the largest rise above the running minimum,
    drawn as a vertical segment at the peak and named in the title."""
    segment = on_segment(alphas)
    alphas, losses = alphas[segment.numpy()], losses[segment]
    if len(losses) == 0:
        return
    running_min = losses.cummin(0).values
    rise = torch.where(running_min == float("inf"), 0.0, losses - running_min)  # (nothing rises from +inf)
    peak = int(rise.nan_to_num(nan=-1.0).argmax())
    if rise[peak] > 0:
        ax.vlines(alphas[peak], running_min[peak], losses[peak], colors="red", lw=2)
    largest = float("nan") if losses.isnan().any() else rise[peak].item()
    ax.set_title(f"loss (Δ_min = {largest:.3g})")


def plane_grid(coords: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The sorted values a (A,) and b (B,) of the two coordinates of (K, 2) `coords`, and
    (B, A) `values` placed by them, as contourf takes them: in whatever order the points
    came. ValueError unless they are a full grid of at least 2 × 2."""
    a, b = coords[:, 0].unique(), coords[:, 1].unique()
    if len(a) < 2 or len(b) < 2 or len(a) * len(b) != len(values):
        raise ValueError(f"plot: plane results must lie on a full grid of at least 2 × 2 points; got {len(values)} "
                         f"points with {len(a)} values of the first coordinate and {len(b)} of the second")
    placed = torch.full((len(b), len(a)), float("nan"), dtype=values.dtype)
    rows, columns = (torch.searchsorted(axis, coords[:, i].contiguous()) for i, axis in ((1, b), (0, a)))
    placed[rows, columns] = values
    times = torch.zeros(len(b), len(a), dtype=torch.long).index_put_((rows, columns), torch.ones_like(rows),
                                                                     accumulate=True)
    if not bool((times == 1).all()):
        raise ValueError("plot: plane results must lie on a full grid; some points repeat and others are missing "
                         "(coordinates that differ by rounding count as different)")
    return a, b, placed


def plot_results(res, path: Path) -> None:
    """Write one panel per value ("loss", metrics) to `path` (any matplotlib format)."""
    names = list(res.values)
    if not names:
        raise ValueError("plot: the result holds no values to draw")
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = res[name].numpy()
        if res.coords.shape[1] == 1:
            alphas = res.alphas.numpy()
            ax.plot(alphas, values, marker=".")
            ax.set_xlabel("α")
            if name == "loss":
                _mark_largest_rise(ax, alphas, res[name])
        else:
            a, b, grid_values = plane_grid(res.coords, res[name])
            contour = ax.contourf(a.numpy(), b.numpy(), grid_values.numpy(), levels=20)
            fig.colorbar(contour, ax=ax)
            ax.set_xlabel("coordinate 1")
            ax.set_ylabel("coordinate 2")
        if not ax.get_title():
            ax.set_title(name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
