"""Geometry of the output path z_x(α) = f(x; θ(α)) along a line: Gauss length and
logit linearity (Lucas et al. 2021, §1.5–1.6 of research/mli_paper.md).

Derivatives along α are forward-mode (torch.func.jvp through the multi-point model, the
coordinates being the variable), never finite differences of the outputs.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from mlifast.engine.batches import Forward, default_forward, to_device
from mlifast.engine.evaluate import recompute_statistics
from mlifast.multipoint import MultiPointModel
from mlifast.spaces import Span
from mlifast.spaces.span import grid_slack


def gauss_length(model: nn.Module, line: Span, data: Iterable, alphas: Any = 50, *,
                 forward: Optional[Forward] = None, bn: str = "interpolate", bn_data: Optional[Iterable] = None,
                 device=None, dtype=None, batch_dim: int = 0) -> float:
    """Average over examples of the Gauss length of the output path:

        GL(x) = ∫ ‖dT_x/dα‖ dα,   T_x = ż_x / ‖ż_x‖,

    the length of the curve traced by the unit tangent (radians; a half circle gives π,
    a straight path 0). dT/dα = (I − T Tᵀ) z̈ / ‖ż‖ with ż, z̈ from nested forward-mode
    derivatives; the integral is the trapezoid rule on the α grid (default 50 points on
    [0, 1]; any order, taken in increasing α). Outputs are flattened per example (logits,
    reconstructions); an example whose output is at rest at an α adds nothing there.

    bn: "interpolate" (running statistics interpolated) or "recompute" (each α's
    statistics recomputed on bn_data, held constant in the derivative, as the paper's code).
    """
    fast, grid = _prepare(model, line, alphas, bn, bn_data or data, forward, device, dtype, batch_dim)
    total, examples = torch.zeros((), dtype=torch.float64), 0
    for batch in data:
        _, dz, d2z = _path_derivatives(fast, batch, forward or default_forward)
        speed = dz.norm(dim=-1, keepdim=True)
        tangent = dz / speed
        turning = (d2z - tangent * (tangent * d2z).sum(-1, keepdim=True)).norm(dim=-1) / speed[..., 0]  # (K, B)
        turning = torch.where(speed[..., 0] > 0, turning, 0.0)  # (an output at rest turns no angle)
        total += torch.trapezoid(turning.double(), grid, dim=0).sum()
        examples += turning.shape[1]
    return _mean(total, examples)


def logit_linearity(model: nn.Module, line: Span, data: Iterable, alphas: Any = 50, *,
                    forward: Optional[Forward] = None, bn: str = "interpolate", bn_data: Optional[Iterable] = None,
                    device=None, dtype=None, batch_dim: int = 0) -> float:
    """∫ mean_x ‖r_x(α)‖² dα, r_x(α) the part of z_x(α) − z_x(0) orthogonal to the chord
    z_x(1) − z_x(0) (squared output units; 0 for straight output paths; all of the path
    where the chord is 0). Trapezoid rule on the α grid, which must contain 0 and 1 (as
    `on_segment` reads them, `grid_slack`: a float32 grid's −3e-8 is 0)."""
    fast, grid = _prepare(model, line, alphas, bn, bn_data or data, forward, device, dtype, batch_dim)
    ends = [((grid - a).abs() <= grid_slack(grid)).nonzero() for a in (0.0, 1.0)]
    if any(e.numel() == 0 for e in ends):
        raise ValueError("logit_linearity: the α grid must contain 0 and 1")
    total, examples = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in data:
            z = _outputs(fast, batch, forward or default_forward).double()  # (K, B, D)
            start, chord = z[ends[0][0, 0]], z[ends[1][0, 0]] - z[ends[0][0, 0]]
            length = chord.norm(dim=-1, keepdim=True)
            unit = torch.where(length > 0, chord / length, 0.0)  # (no chord: the whole path is off it)
            moved = z - start
            r = moved - unit * (moved * unit).sum(-1, keepdim=True)
            total += torch.trapezoid(r.pow(2).sum(-1), grid, dim=0).sum()
            examples += z.shape[1]
    return _mean(total, examples)


def _prepare(model, line, alphas, bn, bn_data, forward, device, dtype, batch_dim):
    if bn not in ("interpolate", "recompute"):
        raise ValueError(f"mlifast: bn must be 'interpolate' or 'recompute' here, got {bn!r}")
    if line.num_directions != 1:
        raise ValueError(f"mlifast: the output path needs a line (one direction), got {line.num_directions}")
    line = line.to(device=device, dtype=dtype)
    coords = line.coords_tensor(alphas)
    coords = coords[coords[:, 0].argsort()]  # (the trapezoid rule integrates in the grid's order)
    fast = MultiPointModel(model, line, coords, batch_dim=batch_dim).eval()
    fast.context.forward_mode = True
    fast.shares_rows = False
    norms = fast.norms
    if bn == "recompute" and norms:
        device = next(iter(line.origin.values())).device
        with torch.no_grad():
            recompute_statistics(fast, norms, bn_data, forward or default_forward, device)
    return fast, coords[:, 0].to(torch.float64)


def _outputs(fast: MultiPointModel, batch, forward: Forward) -> Tensor:
    device = fast.context.coeffs.device
    out = forward(fast, to_device(batch, device))[0]  # (K, …, B, …): each point's batch where the call found it
    dim = (fast.output_batch_dims or (fast.batch_dim,))[0]
    out = out.movedim(1 + dim, 1) if out.dim() > 1 + dim else out
    return out.reshape(out.shape[0], out.shape[1], -1)


def _path_derivatives(fast: MultiPointModel, batch, forward: Forward) -> tuple[Tensor, Tensor, Tensor]:
    """z, ż, z̈ per point and example: (K, B, D) each."""
    coeffs = fast.context.coeffs
    direction = torch.ones_like(coeffs)

    def outputs_at(c: Tensor) -> Tensor:
        fast.context.coeffs = c
        return _outputs(fast, batch, forward)

    def velocity(c: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(outputs_at, (c,), (direction,))

    try:
        (z, dz), (_, d2z) = torch.func.jvp(velocity, (coeffs,), (direction,))
    finally:
        fast.context.coeffs = coeffs
    return z, dz, d2z


def _mean(total: Tensor, examples: int) -> float:
    if examples == 0:
        raise ValueError("mlifast: the data set is empty")
    return (total / examples).item()
