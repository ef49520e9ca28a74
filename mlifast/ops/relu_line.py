"""`relu_line_linear`: the linear layer after a ReLU, along a line of weight space.

On a line θ0 + c·d, a linear layer fed the same rows x at every point outputs
z_k = a + c_k·e (a = x·W1ᵀ + b1, e = x·D1ᵀ + db1). The layer after its ReLU computes, for
each of the K points,

    y[k] = relu(a + c_k·e) · (W + c_k·D)ᵀ + (b + c_k·db)

and with relu=True max(y[k], 0); with negative_slope=α the first relu is a LeakyReLU
(h for h > 0, else α·h). Each row of y[k] is quadratic in c_k over the units
active at c_k, and each unit switches on or off at most once along the line, so the CPU
kernel (csrc/cpu/relu_line_linear.cpp) computes all K points from two GEMMs at the
smallest c plus the units that switch, not K GEMMs. Its rounding is the GEMMs' at the
smallest c over every unit active there, those that switched off since included: about
ε·Σ|h·w| over them. A unit of pre-activation 1e4 that switches off under outputs of size 3
leaves 7e-4 of relative error in float32 (a GEMM at the point itself: 2e-7).

Shapes: base, along (R, I); W, D (O, I); b, db (O,) or None; c (K,). Output (K, R, O).
Float32 and float64; no derivatives (the multi-point model uses it outside autograd only;
called with tensors that carry them, it raises).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mlifast._extension import register_op
from mlifast.ops._checks import check_matching, check_no_derivatives, check_tensors, describe

SCHEMA = (
    "relu_line_linear(Tensor base, Tensor along, Tensor weight, Tensor weight_dir, Tensor? bias, "
    "Tensor? bias_dir, Tensor coeffs, bool relu=False, float negative_slope=0.) -> Tensor"
)
OUT_SCHEMA = (
    "relu_line_linear.out(Tensor base, Tensor along, Tensor weight, Tensor weight_dir, Tensor? bias, "
    "Tensor? bias_dir, Tensor coeffs, bool relu=False, float negative_slope=0., *, Tensor(a!) out) -> Tensor(a!)"
)


def relu_line_linear_reference(
    base: Tensor,
    along: Tensor,
    weight: Tensor,
    weight_dir: Tensor,
    bias: Optional[Tensor],
    bias_dir: Optional[Tensor],
    coeffs: Tensor,
    relu: bool = False,
    negative_slope: float = 0.0,
) -> Tensor:
    """Pure-PyTorch `relu_line_linear`, one point at a time (the oracle of the kernel)."""
    c = coeffs.to(weight.dtype)
    y = base.new_empty((c.shape[0], base.shape[0], weight.shape[0]))
    for k, c_k in enumerate(c):
        y_k = F.leaky_relu(base + c_k * along, negative_slope) @ (weight + c_k * weight_dir).t()
        if bias is not None:
            y_k = y_k + (bias if bias_dir is None else bias + c_k * bias_dir)
        y[k] = torch.relu(y_k) if relu else y_k
    return y


def _relu_line_linear_out_reference(base, along, weight, weight_dir, bias, bias_dir, coeffs, relu=False,
                                    negative_slope=0.0, *, out):
    return out.copy_(relu_line_linear_reference(base, along, weight, weight_dir, bias, bias_dir, coeffs, relu,
                                                negative_slope))


register_op("relu_line_linear", SCHEMA, relu_line_linear_reference)
register_op("relu_line_linear.out", OUT_SCHEMA, _relu_line_linear_out_reference)


@torch.library.register_fake("mlifast::relu_line_linear")
def _(base, along, weight, weight_dir, bias, bias_dir, coeffs, relu=False, negative_slope=0.0):
    return base.new_empty((coeffs.shape[0], base.shape[0], weight.shape[0]))


@torch.library.register_fake("mlifast::relu_line_linear.out")
def _(base, along, weight, weight_dir, bias, bias_dir, coeffs, relu=False, negative_slope=0.0, *, out):
    return out


def relu_line_linear(
    base: Tensor,
    along: Tensor,
    weight: Tensor,
    weight_dir: Tensor,
    bias: Optional[Tensor],
    bias_dir: Optional[Tensor],
    coeffs: Tensor,
    relu: bool = False,
    negative_slope: float = 0.0,
    *,
    out: Optional[Tensor] = None,
) -> Tensor:
    """The K points' outputs of a linear layer after a (Leaky)ReLU whose input is affine
    along a line.

    Args:
        base: (R, I) the ReLU's input at c = 0.
        along: (R, I) its change per unit of c.
        weight, weight_dir: (O, I) the layer's weight at c = 0 and its direction.
        bias, bias_dir: (O,) its bias and the bias's direction, or None.
        coeffs: (K,) the points' coordinates c_k on the line.
        relu: return max(y, 0), the ReLU after the layer (NaN stays NaN).
        negative_slope: the slope of the activation before the layer below 0: 0 for a
            ReLU, α for a LeakyReLU(α).
        out: a contiguous (K, R, O) tensor to write the result into, or None.

    Returns:
        (K, R, O): y[k] = leaky_relu(base + c_k·along, negative_slope)·(weight + c_k·weight_dir)ᵀ
        + bias + c_k·bias_dir
        (`out` where given).
    """
    named = {"base": base, "along": along, "weight": weight, "weight_dir": weight_dir, "bias": bias,
             "bias_dir": bias_dir, "coeffs": coeffs}
    check_tensors("relu_line_linear", named)
    check_no_derivatives("relu_line_linear", *named.values(), out)
    if base.dim() != 2 or weight.dim() != 2 or coeffs.dim() != 1:
        raise ValueError(
            "relu_line_linear: expected base (R, I), weight (O, I) and coeffs (K,), got "
            f"{describe(base)}, {describe(weight)} and {describe(coeffs)}")
    if base.dtype not in (torch.float32, torch.float64) or not coeffs.is_floating_point():
        raise TypeError(f"relu_line_linear: expected float32 or float64, got base {describe(base)}, "
                        f"coeffs {describe(coeffs)}")
    (rows, inputs), outputs = base.shape, weight.shape[0]
    shapes = {"along": (rows, inputs), "weight": (outputs, inputs), "weight_dir": (outputs, inputs),
              "bias": (outputs,), "bias_dir": (outputs,)}
    if bias_dir is not None and bias is None:
        raise ValueError("relu_line_linear: bias_dir given without bias; pass bias (zeros if none)")
    check_matching("relu_line_linear", named, shapes, like="base")
    args = (base, along, weight, weight_dir, bias, bias_dir, coeffs.to(base.dtype), relu, float(negative_slope))
    if out is None:
        return torch.ops.mlifast.relu_line_linear(*args)
    expected = (coeffs.shape[0], rows, outputs)
    if tuple(out.shape) != expected or out.dtype != base.dtype or out.device != base.device or not out.is_contiguous():
        raise ValueError(f"relu_line_linear: out must be a contiguous {expected} tensor like base, got {describe(out)}")
    return torch.ops.mlifast.relu_line_linear.out(*args, out=out)
