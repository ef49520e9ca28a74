"""A module's own moving tensors as every active point's value at once (`PointValues`),
for the generic rule to run the module's forward once for all points instead of once a
point.

What such a module does with its own tensors is mostly glue between its children: a ViT
adds its position embedding to the patch tokens and expands its class token over the
batch (timm's and torchvision's layout keep both on the top module), a block scales its
branch by a LayerScale vector. Run once a point, the whole subtree below ran K times with
every child at one point (a timm-layout ViT: 0.68× the loop; its two tensors moved into a
child, 1.09×). A `PointValues` stands for a tensor of shape S with its (K_active, *S)
values and computes the few operations that glue does, each point's value against that
point's rows of a (K_active·B, …) activation:

- an elementwise +, −, ×, ÷ with an activation, S broadcasting over its batch (fewer
  dimensions than the activation, or a leading 1), in place into the activation too;
- the same with a number or a tensor without the batch: PointValues again;
- `expand` to K_active·B leading rows (the class token over the batch).

Anything else raises `PointValuesRefused` after marking the module to run point by point;
MultiPointModel then runs the call again (nothing computed so far is kept).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mlifast.multipoint.pending import _METADATA, _PROPERTIES, plain
from mlifast.multipoint.trees import tensors_in


class PointValuesRefused(Exception):
    """An operation a PointValues cannot compute for all points at once; its module runs
    point by point from now on, and the call is run again."""


_BINARY = {
    Tensor.__add__, Tensor.__radd__, Tensor.__sub__, Tensor.__rsub__, Tensor.__mul__, Tensor.__rmul__,
    Tensor.__truediv__, Tensor.__rtruediv__, Tensor.add, Tensor.sub, Tensor.mul, Tensor.div,
    torch.add, torch.sub, torch.mul, torch.div,
}
_IN_PLACE = {Tensor.__iadd__, Tensor.__isub__, Tensor.__imul__, Tensor.__itruediv__,
             Tensor.add_, Tensor.sub_, Tensor.mul_, Tensor.div_}


class PointValues(Tensor):
    """A tensor of shape S standing for its `values` (K_active, *S) at the active points,
    inside its module's forward, while activations carry `rows` = K_active·B rows in dim 0
    (see the module doc). `owner`: the GenericRule to mark point by point on a refusal."""

    _values: Tensor
    _rows: int
    _owner: Any

    @staticmethod
    def __new__(cls, values: Tensor, rows: int, owner: Any) -> "PointValues":
        t = Tensor._make_wrapper_subclass(cls, values.shape[1:], dtype=values.dtype, device=values.device)
        t._values, t._rows, t._owner = values, rows, owner
        return t

    def __init__(self, *args, **kwargs) -> None:
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA or getattr(getattr(func, "__self__", None), "__name__", None) in _PROPERTIES:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args = tuple(plain(a) for a in args)
        glue = not kwargs and any(isinstance(a, PointValues) for a in args)
        result = None
        try:
            if glue and len(args) == 2 and (func in _BINARY or (func in _IN_PLACE and not isinstance(args[0], PointValues))):
                result = _binary(func, *args)
            elif glue and func is Tensor.expand and isinstance(args[0], PointValues):
                result = args[0]._expanded(args[1:])
        except RuntimeError:  # (shapes that do not broadcast as glue: the model's own error, point by point)
            result = None
        if result is None:
            _refuse(next(t._owner for t in tensors_in((args, kwargs)) if isinstance(t, PointValues)), func)
        return result

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # (operators reached from C++)
        _refuse(next(t._owner for t in tensors_in((args, kwargs)) if isinstance(t, PointValues)), func)

    def _aligned(self, ndim: int) -> Tensor:
        """values as (K_active, 1, …): S padded with leading 1s to `ndim` dimensions, whose
        first (a 1) becomes the batch's."""
        padded = (1,) * (ndim - self.dim()) + tuple(self.shape)
        return self._values.reshape(self._values.shape[0], 1, *padded[1:])

    def _broadcasts_over(self, x: Tensor) -> bool:
        """Whether x is an activation of `rows` rows that S broadcasts over by its batch."""
        return (x.dim() >= 1 and x.shape[0] == self._rows and self._rows % self._values.shape[0] == 0
                and (self.dim() < x.dim() or (self.dim() == x.dim() and self.shape[0] == 1)))

    def _expanded(self, sizes: tuple) -> Tensor | None:
        """The (rows, …) activation `expand(*sizes)` gives at each point, or None."""
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        if not sizes or sizes[0] != self._rows or len(sizes) < self.dim():
            return None
        padded = (1,) * (len(sizes) - self.dim()) + tuple(self.shape)
        if padded[0] != 1:
            return None
        k = self._values.shape[0]
        rest = tuple(p if s == -1 else s for s, p in zip(sizes[1:], padded[1:]))
        return self._aligned(len(sizes)).expand(k, self._rows // k, *rest).reshape(self._rows, *rest)


def _binary(func, a: Any, b: Any) -> Tensor | None:
    """func(a, b) at each point (see the module doc), or None where it is not elementwise
    glue of a PointValues with an activation, a number or a constant tensor."""
    point = a if isinstance(a, PointValues) else b
    other = b if point is a else a
    k = point._values.shape[0]
    if isinstance(other, Tensor) and type(other) not in (Tensor, torch.nn.Parameter, PointValues):
        return None
    if isinstance(other, Tensor) and not isinstance(other, PointValues) and point._broadcasts_over(other):
        aligned = point._aligned(other.dim())
        if func in _IN_PLACE:
            try:
                folded = other.view(k, point._rows // k, *other.shape[1:])
            except RuntimeError:  # (not a view of its rows: refused)
                return None
            func(folded, aligned)
            return other
        folded = other.reshape(k, point._rows // k, *other.shape[1:])
        result = func(*(aligned if t is point else folded for t in (a, b)))
        return result.reshape(point._rows, *result.shape[2:])
    if func in _IN_PLACE or (isinstance(other, Tensor) and not isinstance(other, PointValues)
                             and other.dim() >= 1 and other.shape[0] == point._rows):
        return None  # (into a PointValues; or rows S does not broadcast over)
    if not isinstance(other, (Tensor, int, float, bool)):
        return None
    # PointValues again: the values against the other's values, a number or a constant, no
    # larger than its own tensors (K of those are held: not K activations' worth)
    shapes = [tuple(t.shape) for t in (a, b) if isinstance(t, Tensor)]
    own = max(math.prod(t.shape) for t in (a, b) if isinstance(t, PointValues))
    if math.prod(torch.broadcast_shapes(*shapes)) > own:
        return None
    ndim = max(t.dim() if isinstance(t, Tensor) else 0 for t in (a, b))

    def lifted(t):
        return t._values.reshape(k, *((1,) * (ndim - t.dim())), *t.shape) if isinstance(t, PointValues) else t

    return PointValues(func(lifted(a), lifted(b)), point._rows, point._owner)


def _refuse(owner: Any, func) -> None:
    owner.all_at_once = False
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    raise PointValuesRefused(f"{name} on a module's own moving tensor")
