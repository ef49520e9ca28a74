"""`multipoint_combine`: the per-point half of a multi-point linear layer on a shared input.

For rows x shared by every point, multipoint_linear computes base = x·Wᵀ and
along[:, j] = x·D_jᵀ once, then for each of the K points

    y[k] = base + (b + Σ_j c[k, j]·db_j) + Σ_j c[k, j]·along[:, j]

(with relu=True max(y[k], 0)). This op is that second step alone, for callers that keep base and along across calls
(mlifast.multipoint evaluates groups of points on the same rows, see PointContext.reuse).

Shapes: base (R, O); along (R, J, O); b (O,) or None; db (J, O) or None; c (K, J).
Output (K, R, O).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlifast._extension import register_op
from mlifast.ops._checks import check_matching, check_tensors, describe, transformed

SCHEMA = (
    "multipoint_combine(Tensor base, Tensor along, Tensor? bias, Tensor? bias_dirs, Tensor coeffs, "
    "bool relu=False) -> Tensor"
)


def multipoint_combine_reference(
    base: Tensor,
    along: Tensor,
    bias: Optional[Tensor],
    bias_dirs: Optional[Tensor],
    coeffs: Tensor,
    relu: bool = False,
) -> Tensor:
    """Pure-PyTorch `multipoint_combine` (the oracle of the kernel, and its fallback)."""
    c = coeffs.to(base.dtype)
    y = base + torch.einsum("kj,rjo->kro", c, along)
    if bias is not None:
        point_bias = bias if bias_dirs is None else bias + c @ bias_dirs  # (O,) or (K, O)
        y = y + (point_bias if point_bias.dim() == 1 else point_bias.unsqueeze(1))
    return torch.relu(y) if relu else y


register_op("multipoint_combine", SCHEMA, multipoint_combine_reference)


@torch.library.register_fake("mlifast::multipoint_combine")
def _(base, along, bias, bias_dirs, coeffs, relu=False):
    return base.new_empty((coeffs.shape[0], base.shape[0], base.shape[1]))


def _setup_context(ctx, inputs, output):
    base, along, _, bias_dirs, coeffs = inputs[:5]
    ctx.relu = len(inputs) > 5 and inputs[5]
    ctx.save_for_backward(along, bias_dirs if bias_dirs is not None else torch.empty(0), coeffs,
                          output if ctx.relu else torch.empty(0))
    ctx.has_bias = inputs[2] is not None
    ctx.has_bias_dirs = bias_dirs is not None


def _backward(ctx, grad):
    along, bias_dirs, coeffs, output = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if ctx.relu:
        grad = grad * (output > 0)
    c = coeffs.to(grad.dtype)
    grad_base = grad.sum(0) if needs[0] else None
    grad_along = torch.einsum("kj,kro->rjo", c, grad) if needs[1] else None
    grad_b = grad.sum((0, 1)) if needs[2] and ctx.has_bias else None
    grad_db = c.t() @ grad.sum(1) if needs[3] and ctx.has_bias_dirs else None
    grad_c = None
    if needs[4]:
        grad_c = torch.einsum("kro,rjo->kj", grad, along)
        if ctx.has_bias_dirs:
            grad_c = grad_c + grad.sum(1) @ bias_dirs.t()
        grad_c = grad_c.to(coeffs.dtype)
    return grad_base, grad_along, grad_b, grad_db, grad_c, None


torch.library.register_autograd("mlifast::multipoint_combine", _backward, setup_context=_setup_context)


def check_multipoint_combine_args(
    base: Tensor,
    along: Tensor,
    bias: Optional[Tensor],
    bias_dirs: Optional[Tensor],
    coeffs: Tensor,
) -> None:
    """Raise TypeError/ValueError naming the first argument that does not fit."""
    named = {"base": base, "along": along, "bias": bias, "bias_dirs": bias_dirs, "coeffs": coeffs}
    check_tensors("multipoint_combine", named)
    if base.dim() != 2:
        raise ValueError(f"multipoint_combine: base must have shape (R, O), got {describe(base)}")
    if not base.is_floating_point():
        raise TypeError(f"multipoint_combine: base must be floating point, got {describe(base)}")
    if coeffs.dim() != 2 or coeffs.shape[1] < 1:
        raise ValueError(
            f"multipoint_combine: coeffs must have shape (K, J) with J >= 1, got {describe(coeffs)}"
        )
    if not coeffs.is_floating_point():
        raise TypeError(f"multipoint_combine: coeffs must be floating point, got {describe(coeffs)}")
    (rows, out_features), directions = base.shape, coeffs.shape[1]
    shapes = {
        "along": (rows, directions, out_features),
        "bias": (out_features,),
        "bias_dirs": (directions, out_features),
    }
    check_matching("multipoint_combine", named, shapes, like="base")


def multipoint_combine(
    base: Tensor,
    along: Tensor,
    bias: Optional[Tensor],
    bias_dirs: Optional[Tensor],
    coeffs: Tensor,
    relu: bool = False,
) -> Tensor:
    """The K points' outputs of a linear layer from its shared input's products.

    Args:
        base: (R, O) x·Wᵀ, the rows shared by every point against the origin's weight.
        along: (R, J, O) x·D_jᵀ, the rows against each direction of the weight.
        bias: (O,) bias at the origin, or None.
        bias_dirs: (J, O) the directions of the bias, or None (bias fixed).
        coeffs: (K, J) coordinates of the K points.
        relu: return max(y, 0), the ReLU applied in the same pass (NaN stays NaN).

    Returns:
        (K, R, O): y[k] = base + Σ_j c_kj along[:, j] + b + Σ_j c_kj db_j, which equals
        multipoint_linear(x, W, b, D, db, c) for base = x·Wᵀ, along[:, j] = x·D_jᵀ.
    """
    check_multipoint_combine_args(base, along, bias, bias_dirs, coeffs)
    if transformed(base, along, bias, bias_dirs, coeffs):  # (jvp, jacfwd, forward_ad, torch.func)
        return multipoint_combine_reference(base, along, bias, bias_dirs, coeffs, relu)
    return torch.ops.mlifast.multipoint_combine(base, along, bias, bias_dirs, coeffs, relu)
