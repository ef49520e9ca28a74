"""A per-point convolution's output, not computed until something reads it.

Batch norm with running statistics right after a convolution is an affine map per
channel, so it folds into each point's convolution weight and bias: one pass over the
activations fewer (W2's evaluation pass: 919 of its 1,050 batch norms, on 64 images). A
`PendingConvolution` carries what the convolutions need; `BatchNormRule` folds itself in
and runs them; any other operation runs them first (`materialize`) and then itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map


class PendingConvolution(Tensor):
    """(K_active·B, C_out, …) output of a convolution with each point's own weight.

    points: (K_active, B, C_in, …) input rows; weight: (K_active, C_out, C_in/groups, …);
    bias: (K_active, C_out) or None; conv: the nn.Conv*d whose `_conv_forward` runs it.
    Only for tensors outside autograd (its result is computed below autograd's dispatch).
    """

    @staticmethod
    def __new__(cls, conv: nn.Module, points: Tensor, weight: Tensor, bias: Optional[Tensor]) -> "PendingConvolution":
        shape = _output_shape(conv, (points.shape[0] * points.shape[1], *points.shape[2:]))
        layout = torch.channels_last if len(shape) == 4 and _channels_last(points[0]) else torch.contiguous_format
        t = Tensor._make_wrapper_subclass(cls, shape, strides=_strides(shape, layout), dtype=points.dtype,
                                          device=points.device)
        t._conv, t._points, t._weight, t._bias, t._value = conv, points, weight, bias, None
        return t

    def __init__(self, *args) -> None:
        pass

    def convolved(self, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
        """The convolutions as a plain tensor; with (K_active, C_out) `scale` and `shift`,
        each point's output channels scaled and shifted, folded into its weight and bias."""
        outs = []
        for k, rows in enumerate(self._points):
            weight, bias = self._weight[k], None if self._bias is None else self._bias[k]
            if scale is not None:
                weight = weight * scale[k].reshape(-1, *([1] * (weight.dim() - 1)))
                bias = shift[k] if bias is None else torch.addcmul(shift[k], bias, scale[k])
            outs.append(self._conv._conv_forward(rows, weight, bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @property
    def computed(self) -> bool:
        """Whether the convolutions ran (anything may have written into the result since)."""
        return self._value is not None

    def materialize(self) -> Tensor:
        if self._value is None:
            self._value = self.convolved()
            self._points = self._weight = self._bias = None
        return self._value

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Shape, dtype and device from the wrapper; everything else — operations, and
        what reads memory without an operator (`data_ptr`, `numpy`) — on the result."""
        kwargs = kwargs or {}
        if func in _METADATA or getattr(getattr(func, "__self__", None), "__name__", None) in _PROPERTIES:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        return func(*tree_map(_computed, args), **tree_map(_computed, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # (operators reached from C++)
        return func(*tree_map(_computed, args), **tree_map(_computed, kwargs or {}))


_METADATA = {Tensor.size, Tensor.dim, Tensor.numel, Tensor.element_size, Tensor.is_floating_point, Tensor.__len__}
_PROPERTIES = {"shape", "dtype", "device", "ndim", "is_cpu", "is_cuda", "requires_grad", "layout", "grad_fn", "is_leaf"}


def _computed(value):
    return value.materialize() if isinstance(value, PendingConvolution) else value


def _output_shape(conv: nn.Module, shape: tuple) -> tuple:
    """(N, C_out, …) of `conv` on an input of `shape` (N, C_in, …)."""
    spatial = shape[2:]
    if conv.padding == "same":
        out = spatial
    else:
        padding = (0,) * len(spatial) if conv.padding == "valid" else conv.padding
        out = tuple((size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for size, pad, dilation, kernel, stride
                    in zip(spatial, padding, conv.dilation, conv.kernel_size, conv.stride))
    return (shape[0], conv.out_channels, *out)


def _channels_last(x: Tensor) -> bool:
    """Whether ATen's convolution answers `x` channels-last (it suggests that layout)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _strides(shape: tuple, layout: torch.memory_format) -> tuple:
    if layout == torch.channels_last:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
