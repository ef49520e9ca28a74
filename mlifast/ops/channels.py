"""`channel_moments` and `channel_affine`: a batch norm's two passes over each point's rows.

A (K·B, C, …) input holds K points' B entries each, point-major (see multipoint/context.py).

- `channel_moments(x, K)`: each point's per-channel mean and biased variance, (K, C) each,
  accumulated in float64 (the batch statistics of a training-mode batch norm);
- `channel_affine(x, scale, shift, addend=None, relu=False)`: x·scale[k, c] + shift[k, c]
  on point k's entries, plus a same-shaped addend, then a ReLU — a batch norm with its
  statistics folded into (K, C) scale and shift, and the residual addition and ReLU after
  it, in one pass.

The CPU kernels (csrc/cpu/channel_passes.cpp) read channels-last images, or (N, C) rows,
or contiguous (N, C, …) in place, and keep the input's layout. Float32 and float64; no
derivatives (the multi-point model uses them outside autograd only; called with tensors
that carry them, they raise).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlifast._extension import register_op
from mlifast.ops._checks import check_no_derivatives, check_tensors, describe

MOMENTS_SCHEMA = "channel_moments(Tensor input, int points) -> (Tensor, Tensor)"
AFFINE_SCHEMA = "channel_affine(Tensor input, Tensor scale, Tensor shift, Tensor? addend, bool relu=False) -> Tensor"
COMBINE_SCHEMA = "channel_combine(Tensor[] inputs, Tensor scales, Tensor shift, bool relu=False) -> Tensor"
MAX_COMBINED = 8  # inputs of one channel_combine (kMaxCombined in csrc/channel_passes_checks.h)


def in_kernel_layout(input: Tensor) -> Tensor:
    """`input` itself where the kernels read it in place (contiguous, or channels-last 4-d
    or 5-d), else a copy: channels-last where the channels are its innermost dimension (a
    strided view of channels-last images, x[:, :, ::2, ::2]), else contiguous. The layout
    of channel_affine's output."""
    if input.is_contiguous() or (input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last)) or (
            input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d)):
        return input
    if input.dim() in (4, 5) and input.stride(1) == 1 and input.shape[1] > 1:
        return input.contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)
    return input.contiguous()


def channel_moments_reference(input: Tensor, points: int) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch `channel_moments` (the oracle of the kernel, and its fallback)."""
    x = input.unflatten(0, (points, -1)).to(torch.float64)
    var, mean = torch.var_mean(x, dim=[1, *range(3, x.dim())], correction=0)
    return mean.to(input.dtype), var.to(input.dtype)


def channel_affine_reference(input: Tensor, scale: Tensor, shift: Tensor, addend: Optional[Tensor] = None,
                             relu: bool = False) -> Tensor:
    """Pure-PyTorch `channel_affine`."""
    k, c = scale.shape
    view = (k, 1, c, *([1] * (input.dim() - 2)))
    y = torch.addcmul(shift.reshape(view), input.unflatten(0, (k, -1)), scale.reshape(view)).flatten(0, 1)
    if addend is not None:
        y = y + addend
    return torch.empty_like(in_kernel_layout(input)).copy_(torch.relu(y) if relu else y)


def _points_of(first: Tensor, points: int) -> Tensor:
    """An empty (K·B, C, …) tensor for K = `points` points' rows in the layout the kernels
    give `first`'s (B, C, …) entries (`in_kernel_layout`)."""
    first = in_kernel_layout(first)
    layout = torch.contiguous_format if first.is_contiguous() else (
        torch.channels_last if first.dim() == 4 else torch.channels_last_3d)
    return torch.empty((points * first.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device,
                       memory_format=layout)


def channel_combine_reference(inputs: list[Tensor], scales: Tensor, shift: Tensor, relu: bool = False) -> Tensor:
    """Pure-PyTorch `channel_combine`."""
    k, n, c = scales.shape
    view = (k, 1, c, *([1] * (inputs[0].dim() - 2)))
    y = shift.reshape(view)  # (first, as the kernel: a folded batch norm's shift cancels the products' mean)
    for j in range(n):
        y = torch.addcmul(y, inputs[j].unsqueeze(0), scales[:, j].reshape(view))
    y = y.flatten(0, 1)
    return _points_of(inputs[0], k).copy_(torch.relu(y) if relu else y)


register_op("channel_moments", MOMENTS_SCHEMA, channel_moments_reference)
register_op("channel_affine", AFFINE_SCHEMA, channel_affine_reference)
register_op("channel_combine", COMBINE_SCHEMA, channel_combine_reference)


@torch.library.register_fake("mlifast::channel_moments")
def _(input, points):
    return input.new_empty((points, input.shape[1])), input.new_empty((points, input.shape[1]))


@torch.library.register_fake("mlifast::channel_affine")
def _(input, scale, shift, addend=None, relu=False):
    return torch.empty_like(in_kernel_layout(input))


@torch.library.register_fake("mlifast::channel_combine")
def _(inputs, scales, shift, relu=False):
    return _points_of(inputs[0], scales.shape[0])


def _check_input(op: str, input: Tensor, points: int) -> None:
    if input.dim() < 2 or points < 1 or input.shape[0] % points:
        raise ValueError(f"{op}: expected input (K·B, C, …) holding {points} points' entries, got {describe(input)}")
    if input.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: expected float32 or float64, got {describe(input)}")


def channel_moments(input: Tensor, points: int) -> tuple[Tensor, Tensor]:
    """Each point's per-channel mean and biased variance.

    Args:
        input: (K·B, C, …) the entries of `points` = K points, point-major.
        points: K.

    Returns:
        mean, var: (K, C) each, in input's dtype (accumulated in float64); var is the
        biased variance (divided by the B·… values per channel).
    """
    check_tensors("channel_moments", {"input": input})
    check_no_derivatives("channel_moments", input)
    _check_input("channel_moments", input, points)
    return torch.ops.mlifast.channel_moments(input, points)


def channel_affine(input: Tensor, scale: Tensor, shift: Tensor, addend: Optional[Tensor] = None,
                   relu: bool = False) -> Tensor:
    """relu?(input·scale + shift + addend?) with each point's own per-channel scale and shift.

    Args:
        input: (K·B, C, …) the entries of K points, point-major.
        scale, shift: (K, C) in input's dtype.
        addend: a tensor of input's shape, dtype and device, or None.
        relu: return max(y, 0) (NaN stays NaN).

    Returns:
        (K·B, C, …) in input's layout.
    """
    check_tensors("channel_affine", {"input": input, "scale": scale, "shift": shift, "addend": addend})
    check_no_derivatives("channel_affine", input, scale, shift, addend)
    channels = input.shape[1] if input.dim() >= 2 else "C"
    if scale.dim() != 2 or scale.shape[1] != channels or shift.shape != scale.shape:
        raise ValueError(f"channel_affine: expected scale and shift of shape (K, {channels}) for input "
                         f"{describe(input)}, got {describe(scale)} and {describe(shift)}")
    _check_input("channel_affine", input, scale.shape[0])
    for name, t in (("scale", scale), ("shift", shift), ("addend", addend)):
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            raise TypeError(f"channel_affine: {name} must have input's dtype and device, got {describe(t)}")
    if addend is not None and addend.shape != input.shape:
        raise ValueError(f"channel_affine: addend must have input's shape {tuple(input.shape)}, got {describe(addend)}")
    return torch.ops.mlifast.channel_affine(input, scale, shift, addend, relu)


def channel_combine(inputs: list[Tensor], scales: Tensor, shift: Tensor, relu: bool = False) -> Tensor:
    """relu?(shift[k] + Σ_j inputs[j]·scales[k, j]) for each point k, per channel: a
    combination of entries every point shares (the products of a first convolution at the
    origin and along each direction, with each point's batch norm folded into its scales).

    Args:
        inputs: n (1 ≤ n ≤ 8) tensors (B, C, …) of one shape, dtype (float32 or float64)
            and device.
        scales: (K, n, C), shift: (K, C), in the inputs' dtype.
        relu: return max(y, 0) (NaN stays NaN).

    Returns:
        (K·B, C, …), point-major, in the first input's layout (channels-last stays so).
    """
    inputs = list(inputs)
    missing = [j for j, t in enumerate(inputs) if t is None]
    if missing:
        raise TypeError(f"channel_combine: inputs[{missing[0]}] is None; every input must be a torch.Tensor")
    check_tensors("channel_combine", {"scales": scales, "shift": shift,
                                      **{f"inputs[{j}]": t for j, t in enumerate(inputs)}})
    check_no_derivatives("channel_combine", scales, shift, *inputs)
    if not 1 <= len(inputs) <= MAX_COMBINED:
        raise ValueError(f"channel_combine: expected 1 to {MAX_COMBINED} inputs, got {len(inputs)}")
    first = inputs[0]
    _check_input("channel_combine", first, 1)
    for j, t in enumerate(inputs[1:], 1):
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"channel_combine: inputs[{j}] must have inputs[0]'s shape, dtype and device "
                             f"{describe(first)}, got {describe(t)}")
    if scales.dim() != 3 or scales.shape[1:] != (len(inputs), first.shape[1]) or shift.shape != (
            scales.shape[0], first.shape[1]):
        raise ValueError(f"channel_combine: expected scales (K, {len(inputs)}, {first.shape[1]}) and shift "
                         f"(K, {first.shape[1]}), got {describe(scales)} and {describe(shift)}")
    for name, t in (("scales", scales), ("shift", shift)):
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(f"channel_combine: {name} must have the inputs' dtype and device, got {describe(t)}")
    return torch.ops.mlifast.channel_combine(inputs, scales, shift, relu)
