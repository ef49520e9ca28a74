"""Per-example losses and metrics over folded (K·B, …) outputs."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Callable[[Tensor, Tensor], Tensor]


# The target value PyTorch's cross_entropy and nll_loss skip by default (padding, a masked
# label): evaluate leaves such targets out of the built-in loss's and accuracy's means.
IGNORE_INDEX = -100


def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """(N, …) 1.0 where the arg-max class of output (N, C, …) equals target (N, …)."""
    return (output.argmax(1) == target).to(torch.float64)


BUILTIN_METRICS: dict[str, Metric] = {"accuracy": accuracy}


def resolve_metrics(metrics) -> dict[str, Metric]:
    """Name → metric for evaluate's `metrics`: None, a name or callable, a sequence of them,
    or a dict naming each callable (the way to name lambdas). Callables are keyed by their
    __name__; a clash of names, or a metric named "loss", is refused."""
    if metrics is None:
        return {}
    if isinstance(metrics, str) or callable(metrics):
        metrics = (metrics,)
    named = metrics.items() if isinstance(metrics, dict) else ((None, m) for m in metrics)
    resolved = {}
    for name, m in named:
        if isinstance(m, str):
            if m not in BUILTIN_METRICS:
                raise ValueError(
                    f"mlifast: unknown metric {m!r}; built in: {sorted(BUILTIN_METRICS)}, or pass a callable")
            name, m = m if name is None else name, BUILTIN_METRICS[m]
        elif not callable(m):
            raise TypeError(
                f"mlifast: a metric is a name or a callable f(output, target) -> per-example values, got {m!r}")
        elif name is None:
            name = getattr(m, "__name__", f"metric{len(resolved)}")
        if not isinstance(name, str):
            raise TypeError(f"mlifast: metrics are named by strings (the results' keys), got {name!r}")
        if name == "loss" or name in resolved:
            raise ValueError(
                f"mlifast: two results would be named {name!r} (" + ("the loss is \"loss\"" if name == "loss" else
                "two metrics share that __name__") + "); name each metric: metrics={'name': fn, ...}"
            )
        resolved[name] = m
    return resolved


def per_example_loss(loss: Union[Callable, None]) -> Metric:
    """The loss (default cross entropy), called with reduction="none" where it takes one."""
    fn = loss if loss is not None else F.cross_entropy
    return functools.partial(fn, reduction="none") if "reduction" in _parameters(fn) else fn


def ignored_target(fn: Metric) -> Optional[int]:
    """The target value whose values `fn` does not count: the built-in accuracy's, and
    cross entropy's or nll_loss's ignore_index (a functools.partial's keyword, or -100);
    None for any other loss or metric."""
    if fn is accuracy:
        return IGNORE_INDEX
    base, keywords = (fn.func, fn.keywords) if isinstance(fn, functools.partial) else (fn, {})
    return keywords.get("ignore_index", IGNORE_INDEX) if base in (F.cross_entropy, F.nll_loss) else None


def per_example_values(name: str, values: Any, rows: int, points: int, target: Tensor,
                       ignored: Optional[int] = None) -> Tensor:
    """(2, rows) float64: each row's numerator and count of the loss or metric `name`,
    from its output on `rows` rows (`points` points' batches). The numerator is the row's
    value averaged over any dims after the first (e.g. tokens) with a count of 1; where
    `ignored` is given and the values are one per class-index target, the sum over the
    targets other than `ignored` with their number as the count (the mean over a data set
    is then cross entropy's own: over every target it does not ignore). ValueError in the
    user's terms (one batch) where it is not one value a row."""
    if not isinstance(values, Tensor) or values.dim() == 0 or values.shape[0] != rows:
        got = f"shape {tuple(values.shape)}" if isinstance(values, Tensor) else type(values).__name__
        what, fix = (("the loss", "accept reduction='none', or return per-example values") if name == "loss" else
                     (f"metric {name!r}", "return per-example values"))
        raise ValueError(
            f"mlifast: {what} returned {got} on a batch of {rows // max(points, 1)} examples; it must return "
            f"one value per example ({fix}). (It was given {points} points' batches at once, {rows} rows.)"
        )
    values = values.reshape(rows, -1).to(torch.float64)
    if ignored is None or target.is_floating_point() or target.numel() != values.numel():
        return torch.stack([values.mean(1), torch.ones_like(values[:, 0])])
    counted = target.reshape(rows, -1) != ignored
    return torch.stack([torch.where(counted, values, 0.0).sum(1), counted.sum(1, dtype=torch.float64)])


def _parameters(fn) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
