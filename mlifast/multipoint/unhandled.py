"""Tensors that refuse to be used where mlifast does not handle them.

Inside a multi-point model every moving parameter is owned by a rule (fused or generic)
that computes with each point's value. The module attribute still holds the origin
tensor, wrapped in `UnhandledTensor`: reading its metadata is fine, computing with it
raises `UnhandledParameterError` naming the module and the parameter — a parent
calling F.linear(h, self.child.weight) would otherwise silently use the origin weights
for every point.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlifast.multipoint.trees import tensors_in

_METADATA = {
    Tensor.dim, Tensor.size, Tensor.numel, Tensor.is_floating_point, Tensor.is_complex,
    Tensor.__len__, Tensor.__hash__, Tensor.__repr__, Tensor.__format__, Tensor.__bool__,
    Tensor.requires_grad_, Tensor.__reduce_ex__, Tensor.__deepcopy__, Tensor.data_ptr,
    Tensor.untyped_storage, Tensor.is_contiguous, Tensor.stride, Tensor.element_size,
    # New tensors that read only the shape, dtype and device (`p.new_zeros(…)`,
    # `next(self.parameters()).data.new(…).zero_()` making an RNN's initial state):
    Tensor.new, Tensor.new_zeros, Tensor.new_ones, Tensor.new_empty, Tensor.new_full, Tensor.new_tensor,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.randint_like,
}
_METADATA_PROPERTIES = {
    "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_meta", "layout",
    "grad", "grad_fn", "is_leaf", "data", "names", "is_sparse", "is_quantized", "is_nested",
    "_base", "__dict__", "output_nr", "_version", "is_mkldnn", "_cdata",
}


class UnhandledParameterError(RuntimeError):
    """A moving parameter was used outside the rule that interpolates it."""


class UnhandledTensor(Tensor):
    """The origin value of a moving parameter, unusable in computation (see module doc)."""

    owner: str
    kind: str

    @staticmethod
    def __new__(cls, origin: Tensor, owner: str, kind: str) -> "UnhandledTensor":
        t = Tensor._make_subclass(cls, origin.detach(), False)
        t.owner, t.kind = owner, kind
        return t

    def __init__(self, origin: Tensor, owner: str, kind: str) -> None:
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None) or getattr(getattr(func, "__self__", None), "__name__", "")
        if func in _METADATA or name in _METADATA_PROPERTIES or name == "__get__" and _is_metadata_getter(func):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            if _is_data_getter(func):  # (its metadata may be read; computing with it raises as with the parameter)
                return UnhandledTensor(out, args[0].owner, args[0].kind)
            return out
        culprit = next(a for a in tensors_in((args, kwargs)) if isinstance(a, UnhandledTensor))
        raise UnhandledParameterError(
            f"mlifast: parameter '{culprit.owner}' ({culprit.kind}) is used by "
            f"{_func_name(func)} outside the module that owns it, where mlifast cannot "
            "give each point its own value (it would silently use the origin's value for "
            "every point). Move the computation into the owning module's forward, or "
            "freeze this parameter (give it a zero direction)."
        )


def _is_metadata_getter(func) -> bool:
    owner = getattr(func, "__self__", None)
    return getattr(owner, "__name__", None) in _METADATA_PROPERTIES


def _is_data_getter(func) -> bool:
    return getattr(getattr(func, "__self__", None), "__name__", None) == "data"


def _func_name(func) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module and module != "torch._C" else name
