"""The fused multi-point linear layer: `multipoint_linear`, its reference, fake and autograd.

For K points of an affine weight space with J directions:

    y[k] = input_k · (W + Σ_j c[k, j]·D_j)ᵀ + (b + Σ_j c[k, j]·db_j)

and with relu=True max(y[k], 0), the activation applied in the same pass. Shapes: input (K, R, I) — R rows per point — or (R, I) when every point sees the same
rows; W (O, I); b (O,) or None; D (J, O, I); db (J, O) or None; c (K, J). Output (K, R, O).
No implementation ever materialises the K weights.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlifast._extension import register_op
from mlifast.ops._checks import check_matching, check_tensors, describe, transformed

SCHEMA = (
    "multipoint_linear(Tensor input, Tensor weight, Tensor? bias, Tensor weight_dirs, "
    "Tensor? bias_dirs, Tensor coeffs, bool relu=False) -> Tensor"
)


def multipoint_linear_reference(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_dirs: Tensor,
    bias_dirs: Optional[Tensor],
    coeffs: Tensor,
    relu: bool = False,
) -> Tensor:
    """Pure-PyTorch `multipoint_linear` (the oracle of the kernels, and their fallback).

    Computes x·Wᵀ and x·D_jᵀ with plain matmuls and combines them per point:
    activations of size (K, J, R, O), never K weights.
    """
    c = coeffs.to(weight.dtype)
    base = torch.matmul(input, weight.t())  # (K, R, O) or (R, O)
    along = torch.matmul(input.unsqueeze(-3), weight_dirs.transpose(1, 2))  # (K, J, R, O) or (J, R, O)
    if input.dim() == 2:
        y = base + torch.einsum("kj,jro->kro", c, along)
    else:
        y = base + torch.einsum("kj,kjro->kro", c, along)
    if bias is not None:
        point_bias = bias if bias_dirs is None else bias + c @ bias_dirs  # (O,) or (K, O)
        y = y + (point_bias if point_bias.dim() == 1 else point_bias.unsqueeze(1))
    return torch.relu(y) if relu else y


register_op("multipoint_linear", SCHEMA, multipoint_linear_reference)


@torch.library.register_fake("mlifast::multipoint_linear")
def _(input, weight, bias, weight_dirs, bias_dirs, coeffs, relu=False):
    return input.new_empty((coeffs.shape[0], input.shape[-2], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    tensors, ctx.relu = inputs[:6], len(inputs) > 6 and inputs[6]
    ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in tensors),
                          output if ctx.relu else torch.empty(0))
    ctx.has_bias = inputs[2] is not None
    ctx.has_bias_dirs = inputs[4] is not None


def _backward(ctx, grad):
    """Gradients of y = x·(W + Σ c D)ᵀ + b + Σ c db (through max(y, 0) with relu), using
    only activation-sized temporaries."""
    x, weight, _, weight_dirs, bias_dirs, coeffs, output = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if ctx.relu:
        grad = grad * (output > 0)
    c = coeffs.to(grad.dtype)
    shared = x.dim() == 2
    grad_x = grad_w = grad_b = grad_d = grad_db = grad_c = None
    # Σ_k c_kj·g_k, (J, R, O): what the directions see of a shared input's gradient.
    g_along = torch.einsum("kj,kro->jro", c, grad) if shared else None
    if needs[0]:
        if shared:
            grad_x = grad.sum(0) @ weight + torch.einsum("jro,joi->ri", g_along, weight_dirs)
        else:
            grad_x = torch.ops.mlifast.multipoint_linear(
                grad, weight.t(), None, weight_dirs.transpose(1, 2), None, coeffs
            )
    if needs[1]:
        grad_w = grad.sum(0).t() @ x if shared else grad.flatten(0, 1).t() @ x.flatten(0, 1)
    if needs[2] and ctx.has_bias:
        grad_b = grad.sum((0, 1))
    if needs[3]:
        if shared:
            grad_d = g_along.transpose(1, 2) @ x
        else:
            grad_d = torch.einsum("kj,kro,kri->joi", c, grad, x)
    if needs[4] and ctx.has_bias_dirs:
        grad_db = c.t() @ grad.sum(1)
    if needs[5]:
        x_along = torch.matmul(x.unsqueeze(-3), weight_dirs.transpose(1, 2))  # (K|1, J, R, O)
        if shared:
            grad_c = torch.einsum("kro,jro->kj", grad, x_along)
        else:
            grad_c = torch.einsum("kro,kjro->kj", grad, x_along)
        if ctx.has_bias_dirs:
            grad_c = grad_c + grad.sum(1) @ bias_dirs.t()
        grad_c = grad_c.to(coeffs.dtype)
    return grad_x, grad_w, grad_b, grad_d, grad_db, grad_c, None


torch.library.register_autograd("mlifast::multipoint_linear", _backward, setup_context=_setup_context)


def check_multipoint_linear_args(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_dirs: Tensor,
    bias_dirs: Optional[Tensor],
    coeffs: Tensor,
) -> None:
    """Raise TypeError/ValueError naming the first argument that does not fit."""
    named = {"input": input, "weight": weight, "bias": bias, "weight_dirs": weight_dirs,
             "bias_dirs": bias_dirs, "coeffs": coeffs}
    check_tensors("multipoint_linear", named)
    if weight.dim() != 2:
        raise ValueError(f"multipoint_linear: weight must have shape (O, I), got {describe(weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"multipoint_linear: weight must be floating point, got {describe(weight)}")
    out_features, in_features = weight.shape
    if coeffs.dim() != 2 or coeffs.shape[1] < 1:
        raise ValueError(
            f"multipoint_linear: coeffs must have shape (K, J) with J >= 1 (one row of coordinates "
            f"per point), got {describe(coeffs)}"
        )
    if not coeffs.is_floating_point():
        raise TypeError(f"multipoint_linear: coeffs must be floating point, got {describe(coeffs)}")
    points, directions = coeffs.shape
    if input.dim() == 3:
        expected_input = f"({points}, R, {in_features})"
        input_ok = input.shape[0] == points and input.shape[2] == in_features
    else:
        expected_input = f"({points}, R, {in_features}) or, shared by every point, (R, {in_features})"
        input_ok = input.dim() == 2 and input.shape[1] == in_features
    if not input_ok:
        raise ValueError(f"multipoint_linear: input must have shape {expected_input}, got {describe(input)}")
    shapes = {
        "weight_dirs": (directions, out_features, in_features),
        "bias": (out_features,),
        "bias_dirs": (directions, out_features),
    }
    check_matching("multipoint_linear", named, shapes, like="weight")


def multipoint_linear(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_dirs: Tensor,
    bias_dirs: Optional[Tensor],
    coeffs: Tensor,
    relu: bool = False,
) -> Tensor:
    """A linear layer evaluated at K points of weight space at once.

    Args:
        input: (K, R, I) rows of each point, or (R, I) rows shared by every point.
        weight: (O, I) weight at the origin of the space.
        bias: (O,) bias at the origin, or None.
        weight_dirs: (J, O, I) the J directions of the weight.
        bias_dirs: (J, O) the J directions of the bias, or None (bias fixed).
        coeffs: (K, J) coordinates of the K points.
        relu: return max(y, 0), the ReLU applied in the same pass (NaN stays NaN).

    Returns:
        (K, R, O): y[k] = input_k · (W + Σ_j c_kj D_j)ᵀ + b + Σ_j c_kj db_j.
    """
    check_multipoint_linear_args(input, weight, bias, weight_dirs, bias_dirs, coeffs)
    if transformed(input, weight, bias, weight_dirs, bias_dirs, coeffs):  # (jvp, jacfwd, forward_ad, torch.func)
        return multipoint_linear_reference(input, weight, bias, weight_dirs, bias_dirs, coeffs, relu)
    return torch.ops.mlifast.multipoint_linear(input, weight, bias, weight_dirs, bias_dirs, coeffs, relu)
