"""Argument checks shared by the Python faces of the fused operations."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad


def describe(t: Tensor) -> str:
    """`(shape) dtype on device`, for error messages."""
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def check_tensors(op: str, named: dict[str, Tensor | None]) -> None:
    """TypeError naming the first argument that is neither a tensor nor None."""
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_matching(op: str, named: dict[str, Tensor | None], shapes: dict[str, tuple],
                   like: str) -> None:
    """The given arguments' shapes (`shapes`), bias_dirs only with a bias, then every
    argument but coeffs in `like`'s dtype and every argument on `like`'s device."""
    for name, shape in shapes.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {describe(t)}")
    if named.get("bias_dirs") is not None and named.get("bias") is None:
        raise ValueError(f"{op}: bias_dirs given without bias; pass bias (zeros if none)")
    ref = named[like]
    for name, t in named.items():
        if t is not None and name != "coeffs" and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have {like}'s dtype {ref.dtype}, got {describe(t)}")
    for name, t in named.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} must be on {like}'s device {ref.device}, got {describe(t)}")


def carries_derivatives(*tensors: Tensor | None) -> bool:
    """Whether any tensor takes part in a derivative: one that requires grad under grad
    mode, a forward-mode dual tensor, or a torch.func transform's wrapper (jvp, grad,
    vmap)."""
    return any(t is not None and t.requires_grad and torch.is_grad_enabled() for t in tensors) or transformed(*tensors)


def transformed(*tensors: Tensor | None) -> bool:
    """Whether any tensor is a forward-mode dual tensor or a torch.func transform's
    wrapper: where only an op's pure-PyTorch form is right (the compiled ops register
    reverse-mode derivatives at most, and a forward tangent through them is lost)."""
    if _compiling():  # (Dynamo cannot trace the functorch query; under torch.compile no tangent reaches here)
        return False
    dual = forward_ad._current_level >= 0  # (inside a dual_level: unpacking costs microseconds a call)
    return any(t is not None and (torch._C._functorch.is_functorch_wrapped_tensor(t)
                                  or (dual and forward_ad.unpack_dual(t).tangent is not None)) for t in tensors)


def check_no_derivatives(op: str, *tensors: Tensor | None) -> None:
    """RuntimeError where `carries_derivatives`: the compiled ops have no derivative rules,
    and a derivative through them would silently be zero."""
    if carries_derivatives(*tensors):
        raise RuntimeError(f"{op} has no derivatives: call it under torch.no_grad(), outside torch.func "
                           "transforms and forward-mode AD, on tensors that do not require grad")


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())
