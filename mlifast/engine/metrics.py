"""Per-example losses and metrics over folded (K·B, …) outputs."""
from __future__ import annotations

import inspect
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Callable[[Tensor, Tensor], Tensor]


def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """(N,) 1.0 where the arg-max class of output (N, C, …) equals target (N, …)."""
    hit = (output.argmax(1) == target).to(torch.float64)
    return hit.reshape(hit.shape[0], -1).mean(1)


BUILTIN_METRICS: dict[str, Metric] = {"accuracy": accuracy}


def resolve_metrics(metrics) -> dict[str, Metric]:
    resolved = {}
    for m in metrics:
        if isinstance(m, str):
            if m not in BUILTIN_METRICS:
                raise ValueError(f"mlifast: unknown metric {m!r}; built in: {sorted(BUILTIN_METRICS)}, or pass a callable")
            resolved[m] = BUILTIN_METRICS[m]
        elif callable(m):
            resolved[getattr(m, "__name__", f"metric{len(resolved)}")] = m
        else:
            raise TypeError(f"mlifast: a metric is a name or a callable f(output, target) -> per-example values, got {m!r}")
    return resolved


def per_example_loss(loss: Union[Callable, None]) -> Metric:
    """Wrap a loss so that it returns (N,) values: reduction="none" where it takes one,
    then the mean over any dimension after the first (e.g. tokens)."""
    fn = loss if loss is not None else F.cross_entropy
    takes_reduction = "reduction" in _parameters(fn)

    def per_example(output: Tensor, target: Tensor) -> Tensor:
        values = fn(output, target, reduction="none") if takes_reduction else fn(output, target)
        if values.dim() == 0 or values.shape[0] != output.shape[0]:
            raise ValueError(
                f"mlifast: the loss returned shape {tuple(values.shape)} for {output.shape[0]} examples; "
                "it must return one value per example (accept reduction='none', or return per-example values)"
            )
        return values.reshape(values.shape[0], -1).to(torch.float64).mean(1)

    return per_example


def _parameters(fn) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
