"""The generic path: any module with moving tensors of its own and no fused rule.

First once for all active points: the module's forward on all their rows, its own moving
tensors standing for every point's value (`point_values.PointValues`, which computes the
elementwise glue such tensors usually take part in: a position embedding added, a class
token expanded, a LayerScale). Where the forward does anything else with them, the module
is marked and the call runs again (MultiPointModel), with the module run once per active
point from then on, on that point's rows, with that point's values of its own tensors
(torch.func.functional_call). What PointValues cannot see is the module's own code mixing
the rows of its batch (a statistic over dim 0), which would then mix the points': so
modules run once for all points only where a first-call check found that the model agrees
(`PointContext.glue_all_at_once`; else the check tries again with them point by point).
Children keep answering through their own rules, for all points or restricted to the one
in flight. Correct for any module whose inputs and
outputs carry the batch in `batch_dim` (0, or 1 for sequence-first RNNs); per point, K×
the calls of a fused rule.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mlifast.multipoint.point_values import PointValues, PointValuesRefused
from mlifast.multipoint.rule import MultiPointRule
from mlifast.multipoint.shared import materialize_all
from mlifast.multipoint.trees import fields_of, is_dataclass_instance, tensors_in, with_fields


# The most bytes of its own moving tensors a point that a module may have to run once for
# all points: PointValues holds every active point's values at once, where glue is small
# (a ViT-L's position embedding, 1 MB) and a weight that would be refused may not be.
ALL_AT_ONCE_MAX_BYTES = 4 << 20


class GenericRule(MultiPointRule):
    # Whether the forward may run once for all points (see the module doc); False once
    # it did something with its own tensors that PointValues refuses.
    all_at_once: bool = True

    def batch_dims(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """For each argument, the dim holding the batch (None: not split)."""
        return [0] * len(args), {name: 0 for name in kwargs}

    def output_dim(self, position: tuple) -> int:
        return 0

    def forward(self, *args, **kwargs) -> Any:
        args, kwargs = materialize_all((args, kwargs))
        k = self.context.num_active
        rows = k * self.context.batch_size
        if self._runs_all_at_once():
            state = {name: PointValues(self.per_point(name), rows, self) for name in self.directions}
            out = functional_call(self.inner, state, args, kwargs)
            if any(isinstance(t, PointValues) for t in tensors_in(out)):  # (its own tensor, returned)
                self.all_at_once = False
                raise PointValuesRefused(f"'{self.path}' returns its own moving tensor")
            return out
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

    def _runs_all_at_once(self) -> bool:
        """Whether to try the forward once for all points: where a first-call check has found
        that it agrees (PointContext.glue_all_at_once), own moving tensors within
        ALL_AT_ONCE_MAX_BYTES, batch in dim 0, no derivatives (PointValues computes outside
        autograd's view of the module's tensors)."""
        context = self.context
        own_bytes = sum(self.origins[n].numel() * self.origins[n].element_size() for n in self.directions)
        return (context.glue_all_at_once and self.all_at_once and 0 < own_bytes <= ALL_AT_ONCE_MAX_BYTES
                and context.batch_dim == 0 and context.batch_size > 0 and not context.forward_mode
                and not torch.is_grad_enabled())


class RecurrentRule(GenericRule):
    """nn.RNN / nn.LSTM / nn.GRU: input batch dim by batch_first, hidden states in dim 1."""

    all_at_once = False  # (its forward hands its weights to the recurrence kernel: refused)

    def batch_dims(self, args, kwargs):
        first = 0 if self.inner.batch_first else 1
        if args and isinstance(args[0], nn.utils.rnn.PackedSequence):
            raise TypeError(
                f"mlifast: '{self.path}' got a PackedSequence, which mlifast cannot split per point; in the "
                "model's forward, run it on the padded batch instead of packing it (and read each sequence's "
                "last valid step with its length, e.g. output[range(B), lengths - 1])")
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
    if is_dataclass_instance(first):
        return with_fields(first, {name: _concat([getattr(o, name) for o in outputs], dim_of, position + (name,))
                                   for name in fields_of(first)})
    return first
