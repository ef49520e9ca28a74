"""How `evaluate` calls the multi-point model on one batch and reads the target.

A batch is a tuple/list `(inputs, target)` — the model is called as model(inputs) —
or a dict: the model is called with every key except the target's ("labels", "label",
"target" or "y") as keyword arguments. For anything else pass
`forward(model, batch) -> (output, target)` to `evaluate`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

TARGET_KEYS = ("labels", "label", "target", "targets", "y")

Forward = Callable[[torch.nn.Module, Any], "tuple[Any, Tensor]"]


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """The batch's tensors on `device`; floating ones in `dtype` when given."""
    if isinstance(batch, Tensor):
        cast = dtype if dtype is not None and batch.is_floating_point() else None
        return batch.to(device, dtype=cast, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    return batch


def default_forward(model: torch.nn.Module, batch: Any) -> tuple[Any, Tensor]:
    args, kwargs, target = inputs_and_target(batch)
    return model(*args, **kwargs), target


def inputs_and_target(batch: Any) -> tuple[tuple, dict, Tensor]:
    """The model's positional and keyword arguments, and the target, of a batch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0],), {}, batch[1]
    if isinstance(batch, dict):
        keys = [k for k in TARGET_KEYS if k in batch]
        if len(keys) != 1:
            raise ValueError(
                f"mlifast: a dict batch needs exactly one target key among {TARGET_KEYS}, got keys "
                f"{sorted(batch)}; or pass forward=lambda model, batch: (output, target)"
            )
        return (), {k: v for k, v in batch.items() if k != keys[0]}, batch[keys[0]]
    raise TypeError(
        f"mlifast: cannot read a batch of type {type(batch).__name__}; batches must be "
        "(inputs, target) tuples or dicts, or pass forward=lambda model, batch: (output, target)"
    )
