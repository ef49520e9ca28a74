"""Argument checks shared by the Python faces of the fused operations."""
from __future__ import annotations

from torch import Tensor


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
