"""`winograd_conv3x3`: a 3×3, stride-1 convolution of float32 images by Winograd's
F(4×4, 3×3), with a residual addend and a ReLU in its last step; for one point, or for K
points in one call (a (K, C_out, C_in, 3, 3) weight, each point's on its own images); and,
if asked, the per-channel mean and variance of its output (`moments`: a batch norm's
statistics without a pass of their own).

Each 4×4 output tile takes 36 multiply-adds per input and output channel where a direct
convolution takes 144; transforming tiles costs some of that back. On W2's ResNet-20 shapes
the CPU kernel (csrc/cpu/winograd_conv.cpp) is 1.7–1.9× oneDNN's direct convolution,
1.9–2.1× with the residual addition and ReLU (benchmarks/winograd_conv.py). An input map,
x·scale + shift per input channel and a ReLU, runs in its first step: a batch norm and
ReLU before it without a pass of their own. Its rounding differs:
against float64, about 5e-6 of the largest output where the direct convolution's is 5e-7 to
1e-6 (the transforms' constants, up to 8, amplify rounding), a NaN or inf in an input
tile reaches all 16 outputs of the tile, and inputs beyond about 1e37 overflow in the
input transform (its sums of up to 25 values) where a direct convolution stays finite. Channels must be multiples of 16; no derivatives (it refuses tensors that carry them).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mlifast._extension import register_op
from mlifast.ops._checks import check_no_derivatives, check_tensors, describe

SCHEMA = ("winograd_conv3x3(Tensor input, Tensor weight, Tensor? bias, int[2] padding, Tensor? addend, "
          "bool relu=False, Tensor? input_scale=None, Tensor? input_shift=None, bool input_relu=False) -> Tensor")
OUT_SCHEMA = ("winograd_conv3x3.out(Tensor input, Tensor weight, Tensor? bias, int[2] padding, Tensor? addend, "
              "bool relu=False, Tensor? input_scale=None, Tensor? input_shift=None, bool input_relu=False, *, "
              "Tensor(a!) out, Tensor(b!)? moments=None) -> Tensor(a!)")
CHANNEL_MULTIPLE = 16


def winograd_conv3x3_reference(input: Tensor, weight: Tensor, bias: Optional[Tensor], padding: Sequence[int],
                               addend: Optional[Tensor] = None, relu: bool = False,
                               input_scale: Optional[Tensor] = None, input_shift: Optional[Tensor] = None,
                               input_relu: bool = False) -> Tensor:
    """Pure-PyTorch `winograd_conv3x3` (a direct convolution: its oracle up to rounding)."""
    if (input_scale is None) != (input_shift is None):
        raise ValueError("winograd_conv3x3: input_scale and input_shift come together (pass both or neither)")
    if weight.dim() == 5:  # (K points, each its own operands on its own images)
        if len(weight) == 0 or input.shape[0] % len(weight):
            raise ValueError(f"winograd_conv3x3: a weight of {len(weight)} points needs a multiple of {len(weight)} "
                             f"images (each point's in turn), got {input.shape[0]}")
        parts = [winograd_conv3x3_reference(x, w, None if bias is None else bias[k], padding,
                                            None if addend is None else addend.chunk(len(weight))[k], relu,
                                            None if input_scale is None else input_scale[k],
                                            None if input_shift is None else input_shift[k], input_relu)
                 for k, (x, w) in enumerate(zip(input.chunk(len(weight)), weight))]
        return torch.cat(parts).contiguous(memory_format=torch.channels_last)
    if input_scale is not None:
        input = torch.addcmul(input_shift.reshape(-1, 1, 1), input, input_scale.reshape(-1, 1, 1))
    if input_relu:
        input = torch.relu(input)
    y = F.conv2d(input, weight, bias, padding=tuple(padding))
    if addend is not None:
        y = y + addend
    return (torch.relu(y) if relu else y).contiguous(memory_format=torch.channels_last)


def _winograd_conv3x3_out_reference(input, weight, bias, padding, addend=None, relu=False, input_scale=None,
                                    input_shift=None, input_relu=False, *, out, moments=None):
    out.copy_(winograd_conv3x3_reference(input, weight, bias, padding, addend, relu, input_scale, input_shift,
                                         input_relu))
    if moments is not None:
        k = len(weight) if weight.dim() == 5 else 1
        points = out.unflatten(0, (k, out.shape[0] // k))
        var, mean = torch.var_mean(points.to(torch.float64), dim=(1, 3, 4), correction=0)
        moments.copy_(torch.stack((mean, var), 1).reshape(moments.shape))
    return out


register_op("winograd_conv3x3", SCHEMA, winograd_conv3x3_reference)
register_op("winograd_conv3x3.out", OUT_SCHEMA, _winograd_conv3x3_out_reference)


@torch.library.register_fake("mlifast::winograd_conv3x3")
def _(input, weight, bias, padding, addend=None, relu=False, input_scale=None, input_shift=None, input_relu=False):
    n, _, h, w = input.shape
    return input.new_empty((n, weight.shape[-4], h + 2 * padding[0] - 2, w + 2 * padding[1] - 2)).contiguous(
        memory_format=torch.channels_last)


@torch.library.register_fake("mlifast::winograd_conv3x3.out")
def _(input, weight, bias, padding, addend=None, relu=False, input_scale=None, input_shift=None, input_relu=False, *,
      out, moments=None):
    return out


def winograd_conv3x3(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     padding: int | Sequence[int] = (1, 1), addend: Optional[Tensor] = None, relu: bool = False,
                     *, input_scale: Optional[Tensor] = None, input_shift: Optional[Tensor] = None,
                     input_relu: bool = False, out: Optional[Tensor] = None,
                     moments: Optional[Tensor] = None) -> Tensor:
    """relu?(conv2d(x, weight, bias, stride=1, padding=padding) + addend?), x = relu?(input ·
    input_scale + input_shift) per input channel (a batch norm and ReLU the input has not
    had yet; the zero padding is x's).

    Args:
        input: (N, C_in, H, W) float32, C_in a multiple of 16 (read channels-last; another
            layout is copied first).
        weight: (C_out, C_in, 3, 3) float32, C_out a multiple of 16; or (K, C_out, C_in, 3, 3)
            for K points, point k's weight on images [k·N/K, (k+1)·N/K) (one call for a
            group of points: one dispatch, and every thread busy to the end). Then bias,
            input_scale, input_shift and moments have a leading K dimension too.
        bias: (C_out,) ((K, C_out) for K points) or None.
        padding: zeros on each side: (rows, columns), or one int for both.
        addend: a tensor of the output's shape (N, C_out, H + 2·rows − 2, W + 2·columns − 2),
            or None.
        relu: return max(y, 0) (NaN stays NaN).
        input_scale, input_shift: (C_in,) ((K, C_in)) float32 each, or both None.
        input_relu: x = max(x, 0) (NaN stays NaN).
        out: a channels-last float32 tensor of the output's shape to write into (not
            overlapping input; it may be the addend), or None.
        moments: a (2, C_out) ((K, 2, C_out)) float64 tensor that receives the output's
            per-channel mean and biased variance over images and positions (each point's),
            or None. About 1e-8 of the variance from float64's (up to 4e-7 on a few
            partial tiles, or a ReLU's channel with few positive values); a constant
            channel's is 0. Sums of squares are float32's: outputs below about 1e-19 lose
            their variance.

    Returns:
        (N, C_out, H', W') float32, channels-last (`out` where given).
    """
    check_tensors("winograd_conv3x3", {"input": input, "weight": weight, "bias": bias, "addend": addend, "out": out,
                                       "moments": moments, "input_scale": input_scale, "input_shift": input_shift})
    check_no_derivatives("winograd_conv3x3", input, weight, bias, addend, out, input_scale, input_shift, moments)
    padding = (padding, padding) if isinstance(padding, int) else padding
    if not (isinstance(padding, Sequence) and len(padding) == 2 and all(isinstance(p, int) for p in padding)):
        raise ValueError(f"winograd_conv3x3: padding must be an int or (rows, columns) of ints, got {padding!r}")
    if input.dim() != 4 or weight.dim() not in (4, 5) or tuple(weight.shape[-3:]) != (input.shape[1], 3, 3):
        raise ValueError(f"winograd_conv3x3: expected input (N, C_in, H, W) and weight (C_out, C_in, 3, 3) or "
                         f"(K, C_out, C_in, 3, 3), got {describe(input)} and {describe(weight)}")
    points, c_in, c_out = tuple(weight.shape[:-4]), input.shape[1], weight.shape[-4]
    if points and points[0] == 0:
        raise ValueError(f"winograd_conv3x3: a weight of 0 points, {describe(weight)}: give it at least one")
    if points and input.shape[0] % points[0]:
        raise ValueError(f"winograd_conv3x3: a weight of {points[0]} points needs a multiple of {points[0]} images "
                         f"(each point's in turn), got {describe(input)}")
    if c_in % CHANNEL_MULTIPLE or c_out % CHANNEL_MULTIPLE:
        raise ValueError(f"winograd_conv3x3: channels must be multiples of {CHANNEL_MULTIPLE}, got "
                         f"{c_in} in and {c_out} out (use torch.conv2d for these)")
    if (input_scale is None) != (input_shift is None):
        raise ValueError("winograd_conv3x3: input_scale and input_shift come together (pass both or neither)")
    for name, t, shape, what in (("input_scale", input_scale, (*points, c_in), "input channel"),
                                 ("input_shift", input_shift, (*points, c_in), "input channel"),
                                 ("bias", bias, (*points, c_out), "output channel")):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"winograd_conv3x3: {name} must be {shape}, one value per {what}"
                             f"{' and point' if points else ''}, got {describe(t)}")
    for name, t in (("input", input), ("weight", weight), ("bias", bias), ("addend", addend),
                    ("input_scale", input_scale), ("input_shift", input_shift)):
        if t is not None and (t.dtype != torch.float32 or t.device != input.device):
            raise TypeError(f"winograd_conv3x3: {name} must be float32 on input's device, got {describe(t)}")
    if moments is not None and tuple(moments.shape) != (*points, 2, c_out):
        raise ValueError(f"winograd_conv3x3: moments must be of shape {(*points, 2, c_out)} (mean and variance per "
                         f"output channel{' and point' if points else ''}), got {describe(moments)}")
    if moments is not None and (moments.dtype != torch.float64 or moments.device != input.device):
        raise TypeError(f"winograd_conv3x3: moments must be float64 on input's device, got {describe(moments)}")
    args = (input, weight, bias, list(padding), addend, relu, input_scale, input_shift, input_relu)
    if out is None and moments is None:
        return torch.ops.mlifast.winograd_conv3x3(*args)
    if out is None:  # (a kernel's output the op checks)
        n, _, h, w = input.shape
        out = torch.empty((n, c_out, max(h + 2 * padding[0] - 2, 0), max(w + 2 * padding[1] - 2, 0)),
                          dtype=input.dtype, device=input.device, memory_format=torch.channels_last)
    return torch.ops.mlifast.winograd_conv3x3.out(*args, out=out, moments=moments)
