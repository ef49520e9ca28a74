"""The generic path: any module with moving tensors of its own and no fused rule.

Runs the module once per active point, on that point's rows, with that point's values
of its own tensors (torch.func.functional_call). Children keep answering through their
own rules, restricted to the one point in flight. Correct for any module whose inputs
and outputs carry the batch in `batch_dim` (0, or 1 for sequence-first RNNs); K× the
calls of a fused rule.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mlifast.multipoint.rule import MultiPointRule
from mlifast.multipoint.shared import materialize_all


class GenericRule(MultiPointRule):
    def batch_dims(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """For each argument, the dim holding the batch (None: not split)."""
        return [0] * len(args), {name: 0 for name in kwargs}

    def output_dim(self, position: tuple) -> int:
        return 0

    def forward(self, *args, **kwargs) -> Any:
        args, kwargs = materialize_all((args, kwargs))
        k = self.context.num_active
        rows = k * self.context.batch_size
        arg_dims, kwarg_dims = self.batch_dims(args, kwargs)
        split_args = [_split(a, d, k, rows) for a, d in zip(args, arg_dims)]
        split_kwargs = {n: _split(v, kwarg_dims[n], k, rows) for n, v in kwargs.items()}
        outputs = []
        for point in range(k):
            state = self.point_state(point)
            with self.context.only_point(point):
                outputs.append(functional_call(
                    self.inner, state,
                    tuple(a[point] for a in split_args),
                    {n: v[point] for n, v in split_kwargs.items()},
                ))
        return _concat(outputs, self.output_dim, ())


class RecurrentRule(GenericRule):
    """nn.RNN / nn.LSTM / nn.GRU: input batch dim by batch_first, hidden states in dim 1."""

    def batch_dims(self, args, kwargs):
        first = 0 if self.inner.batch_first else 1
        if args and isinstance(args[0], nn.utils.rnn.PackedSequence):
            raise TypeError(f"mlifast: '{self.path}' got a PackedSequence; pass padded tensors instead")
        dims = [first] + [1] * (len(args) - 1)
        return dims, {name: (first if name == "input" else 1) for name in kwargs}

    def output_dim(self, position):
        return (0 if self.inner.batch_first else 1) if position == (0,) else 1


def _split(value: Any, dim: int, points: int, rows: int) -> list:
    """`points` per-point pieces of a batch-carrying tensor (or nested tuple of them)."""
    if isinstance(value, Tensor) and value.dim() > dim and value.shape[dim] % rows == 0 and value.shape[dim] > 0:
        return list(value.chunk(points, dim=dim))
    if isinstance(value, (tuple, list)) and value and any(isinstance(v, Tensor) for v in value):
        parts = [_split(v, dim, points, rows) for v in value]
        return [type(value)(p[i] for p in parts) for i in range(points)]
    return [value] * points


def _concat(outputs: list, dim_of, position: tuple) -> Any:
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs, dim=dim_of(position))
    if isinstance(first, (tuple, list)):
        joined = [_concat([o[i] for o in outputs], dim_of, position + (i,)) for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    if isinstance(first, dict):
        return type(first)({key: _concat([o[key] for o in outputs], dim_of, position + (key,)) for key in first})
    return first
