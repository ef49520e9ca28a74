"""Linear → ReLU → Linear on rows shared by every point of a line, as one operation.

On a line θ0 + c·d the first moving linear layer of an MLP sees the same rows x at every
point, so its output is affine in c: a + c·e, with a and e computed once for all points.
The linear layer after its ReLU then needs, at each point, relu(a + c_k·e)·(W + c_k·D)ᵀ:
`mlifast.ops.relu_line_linear` computes that for all K points from one GEMM plus the
units that switch on or off between consecutive points, not K GEMMs (W1: the MLI paper's
MNIST MLP, whose 1024×1024 second layer is most of its FLOPs).

`fuse_activations` puts a `LinearReluLinear` in place of such a pair in an nn.Sequential;
it falls back to the two rules wherever the operation does not apply.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlifast._extension import compiled
from mlifast.multipoint.layers import LinearRule
from mlifast.multipoint.shared import SharedRows
from mlifast.ops import relu_line_linear

# The outputs of all the points of a call (K × rows × outputs) are computed at once when
# the points run in groups (each group then takes its share): one sweep along the line
# instead of one per group. Above this many bytes, each group computes its own.
ALL_POINTS_BYTES = 512 << 20


def _storage_uses(t: Tensor) -> int | None:
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):  # (a torch without it: never reused)
        return None


_SOLE_HOLDER_USES = _storage_uses(torch.empty(1))


def _sole_holder(t: Tensor) -> bool:
    """Whether no other tensor (a view kept by the model or the caller) shares t's memory."""
    uses = _storage_uses(t)
    return uses is not None and uses == _SOLE_HOLDER_USES


class LinearReluLinear(nn.Module):
    """`second(relu(first(x)))` for two LinearRules, `first.relu` set; see the module doc."""

    fresh_output = True

    def __init__(self, first: LinearRule, second: LinearRule) -> None:
        super().__init__()
        assert first.relu, "the first linear rule must end in the ReLU"
        self.first, self.second = first, second
        self._output: Tensor | None = None  # see _output_memory

    def forward(self, x: Tensor) -> Tensor:
        if not self._applies(x):
            return self.second(self.first(x))
        context, rows = self.first.context, x.rows()
        flat = rows.reshape(-1, rows.shape[-1])
        (w1, d1), (w2, d2) = self.first.weight_and_directions(), self.second.weight_and_directions()
        b1, db1 = self.first.origin("bias"), self.first.directions.get("bias")
        b2, db2 = self.second.origin("bias"), self.second.directions.get("bias")
        db2 = db2[0] if db2 is not None and b2 is not None else None
        a, e = context.reuse(lambda: (F.linear(flat, w1, b1), F.linear(flat, d1[0], None if b1 is None or db1 is None else db1[0])),
                             flat, w1, d1, owner=self)

        def at(coeffs: Tensor) -> Tensor:
            out = self._output_memory((coeffs.shape[0], flat.shape[0], w2.shape[0]), flat)
            return relu_line_linear(a, e, w2, d2[0], b2, db2, coeffs[:, 0], self.second.relu, out)

        k, outputs = context.num_active, w2.shape[0]
        everyone = context.coeffs.shape[0] * flat.shape[0] * outputs * flat.element_size()
        if context.grouped and everyone <= ALL_POINTS_BYTES:
            y = context.of_active(context.reuse(lambda: at(context.coeffs), flat, w1, d1, w2, d2, owner=self.second))
        else:
            y = at(context.active_coeffs())
        return y.reshape(k, *rows.shape[:-1], outputs).flatten(0, 1)

    def _output_memory(self, shape: tuple, like: Tensor) -> Tensor:
        """Memory for the op's output: the last call's, where nothing else still holds any of
        it. Outputs of hundreds of megabytes (W1: 50 points × 1000 rows × 1024) are mapped
        fresh by glibc on every call, and touching each new page cost more than writing it
        (W1: 55 against 15 ms a batch)."""
        kept = self._output
        if (kept is None or tuple(kept.shape) != shape or kept.dtype != like.dtype or kept.device != like.device
                or not _sole_holder(kept)):
            kept = self._output = like.new_empty(shape)
        return kept

    def _applies(self, x: Tensor) -> bool:
        """Rows shared by every point of a line, float32/64 on the CPU with the compiled
        kernel, both weights moving, outside autograd and forward mode."""
        context = self.first.context
        weights = (*self.first.weight_and_directions(), *self.second.weight_and_directions())
        return (isinstance(x, SharedRows) and x.is_cpu and x.dtype in (torch.float32, torch.float64)
                and all(w is None or w.dtype == x.dtype for w in weights)
                and context.coeffs.shape[1] == 1 and not context.forward_mode
                and compiled("relu_line_linear", "cpu") and all(w is not None for w in weights)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, context.coeffs, *weights))))
