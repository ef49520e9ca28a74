"""Rows shared by every point: the model's inputs before the first layer that moves.

Until an activation meets a moving parameter it is the same for all K points, so it
travels as a `SharedRows` tensor of B rows (not K·B). Row-wise operations with constant
operands keep it shared (activations, pooling, flatten, frozen linear/conv/norm layers,
arithmetic with tensors that have no batch dimension); a rule computes its per-point
output from the B rows — the first linear layer costs (J+1)·B row-products instead of
K·B. Any other operation first materialises the K·B rows, point-major, and runs as usual.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mlifast.multipoint.trees import map_tensors, tensors_in

_ROWWISE_UNARY = {
    F.relu, torch.relu, F.gelu, F.silu, F.leaky_relu, F.elu, F.softplus, F.hardtanh, F.relu6,
    torch.tanh, torch.sigmoid, Tensor.tanh, Tensor.sigmoid, Tensor.relu, F.mish, F.hardswish,
    F.dropout, F.pad, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.flatten, Tensor.flatten, Tensor.view, Tensor.reshape, torch.reshape, Tensor.contiguous,
    Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.to, Tensor.clone,
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.layer_norm, F.group_norm, F.embedding, F.batch_norm,
    torch._C._nn.linear, torch.conv1d, torch.conv2d, torch.conv3d, torch.layer_norm, torch.group_norm,
    torch.batch_norm, torch.embedding, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
    torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d, torch._C._nn.pad,
}
if hasattr(F, "rms_norm"):
    _ROWWISE_UNARY.add(F.rms_norm)
_ELEMENTWISE = {
    torch.add, torch.sub, torch.mul, torch.div, Tensor.add, Tensor.sub, Tensor.mul, Tensor.div,
    Tensor.__add__, Tensor.__radd__, Tensor.__sub__, Tensor.__rsub__, Tensor.__mul__, Tensor.__rmul__,
    Tensor.__truediv__, Tensor.__rtruediv__,
}


_METADATA = {Tensor.size, Tensor.dim, Tensor.numel, Tensor.__len__, Tensor.is_floating_point,
             Tensor.__repr__, Tensor.__format__, Tensor.element_size, Tensor.is_contiguous}


class SharedRows(Tensor):
    """B rows that are the same for each of `points` points (see module doc). `context`:
    the PointContext whose `reuse` keeps what row-wise operations compute from them for the
    call's next groups of points (None: computed each time)."""

    points: int

    @staticmethod
    def __new__(cls, rows: Tensor, points: int, context: Any = None) -> "SharedRows":
        t = Tensor._make_subclass(cls, rows, rows.requires_grad)
        t.points, t.context = points, context
        return t

    def __init__(self, rows: Tensor, points: int, context: Any = None) -> None:
        pass

    def rows(self) -> Tensor:
        """The B rows as a plain tensor."""
        return self.as_subclass(Tensor)

    def materialize(self) -> Tensor:
        """(K·B, …) plain tensor: the rows repeated for each point, point-major."""
        rows = self.rows()
        return rows.unsqueeze(0).expand(self.points, *rows.shape).flatten(0, 1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shared = [a for a in tensors_in((args, kwargs)) if isinstance(a, SharedRows)]
        if _writes_in_place(func, args, shared):
            raise SharedRowsWritten(getattr(func, "__name__", repr(func)))
        points, context = shared[0].points, shared[0].context
        if func is Tensor.__getitem__ and args[0] is shared[0] and _keeps_every_row(args[1]):
            with torch._C.DisableTorchFunctionSubclass():
                return SharedRows(args[0].rows()[args[1]], points, context)  # (x[:, :, ::2, ::2]: a view)
        if func in _ROWWISE_UNARY or func in _ELEMENTWISE:
            batch = shared[0].shape[0]
            if _only_constants_besides(args, kwargs, shared[0].dim(), first_only=func in _ROWWISE_UNARY):
                def compute():
                    with torch._C.DisableTorchFunctionSubclass():
                        return func(*map_tensors(_rows, args), **map_tensors(_rows, kwargs))

                constants = _constants(args, kwargs)
                if context is None or constants is None or func in _RANDOM:
                    out = compute()
                else:  # (kept for the call's next groups: x * 2 - 1 before a first layer)
                    out = context.reuse(compute, *map(_rows, tensors_in((args, kwargs))), key=(func, constants))
                if isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == batch:
                    return SharedRows(out, points, context)
        if func in _METADATA or getattr(func, "__name__", "") == "__get__":
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)  # metadata (shape, dtype, …) of the B rows
        return func(*materialize_all(args), **materialize_all(kwargs))


class SharedRowsWritten(Exception):
    """An operation writes into shared rows in place: the rows cannot stay shared (what is
    written may differ per point); the caller repeats the rows instead."""


def _writes_in_place(func, args, shared) -> bool:
    """Whether func writes into one of the shared tensors (x.add_(…), x[i] = …, x += …);
    whitelisted functions with inplace=True are fine (they act on every point alike)."""
    name = getattr(func, "__name__", "")
    in_place = name == "__setitem__" or (name.startswith("__i") and name.endswith("__")) or (
        name.endswith("_") and not name.startswith("_"))
    return in_place and bool(args) and any(args[0] is t for t in shared)


_RANDOM = {F.dropout}  # (row-wise, but each call draws anew)


def _constants(args: tuple, kwargs: dict) -> Optional[tuple]:
    """A hashable description of the non-tensor arguments (tensors as placeholders), or
    None where one cannot be hashed."""
    def describe(value):
        if isinstance(value, Tensor):
            return Tensor
        if isinstance(value, (list, tuple)):
            return type(value), tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return dict, tuple((k, describe(v)) for k, v in sorted(value.items()))
        if isinstance(value, float):
            return float, value.hex()  # (0.0 and -0.0 differ)
        hash(value)
        return type(value), value

    try:
        return describe(args), describe(kwargs)
    except TypeError:
        return None


def _keeps_every_row(index) -> bool:
    """Whether indexing with `index` keeps dimension 0 whole and first: a tuple of a full
    slice then basic indices (slices, ints, Ellipsis, None) — row-wise."""
    return (isinstance(index, tuple) and len(index) > 0 and isinstance(index[0], slice) and index[0] == slice(None)
            and all(isinstance(i, (slice, int)) or i is Ellipsis or i is None for i in index[1:])
            and not any(isinstance(i, bool) for i in index))


def _rows(value: Tensor, _path: str = "") -> Tensor:
    return value.rows() if isinstance(value, SharedRows) else value


def materialize(value: Tensor, _path: str = "") -> Tensor:
    return value.materialize() if isinstance(value, SharedRows) else value


def materialize_all(tree: Any) -> Any:
    return map_tensors(materialize, tree)


def _only_constants_besides(args, kwargs, shared_dims: int, first_only: bool) -> bool:
    """Every tensor operand other than the shared ones is a plain tensor without a batch
    dimension (a frozen layer's weight, a constant); for row-wise layer functions only the
    first argument may be shared."""
    for t in tensors_in((args, kwargs)):
        if isinstance(t, SharedRows):
            if first_only and t is not args[0]:
                return False
        elif type(t) is not Tensor and not isinstance(t, torch.nn.Parameter):
            return False  # another subclass (e.g. an UnhandledTensor) must see the call
        elif not first_only and t.dim() >= shared_dims and t.shape[0] != 1:
            return False  # may carry the batch: pair rows only once materialised
    return True
