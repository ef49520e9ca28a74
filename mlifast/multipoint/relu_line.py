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

# A line's outputs are computed at once, from its first point's GEMMs: 4 times the FLOPs
# of one point's. Below this many points a line is not worth it (the two rules run): on
# the 2-core CI CPU (benchmarks/relu_line_crossover.py: float32, 1024 → 1024, 64 and 1000
# rows) the op took the two rules' time at 6 points, 0.8× at 8 and 0.5× at 12.
MIN_POINTS_PER_LINE = 8
# Nor above this many bytes of a line's outputs (K × rows × outputs).
LINE_BYTES = 512 << 20
# Output memories kept for reuse between calls (see _output_memory).
KEPT_OUTPUTS = 4


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


class Lines:
    """The points of one call (K, J) as runs of consecutive points that differ in one
    coordinate only, `runs` [(start, stop, axis)]: each run lies on a line of weight space
    along direction `axis`. A line is one run; a plane's grid its rows or its columns (in
    either order, snake included); `make demo`'s two lines from θ0, (α, 0) then (0, α),
    one run each. And the runs' outputs computed so far (`outputs`)."""

    def __init__(self, coeffs: Tensor) -> None:
        self.coeffs = coeffs
        points, self.runs = coeffs.tolist(), []
        start = 0
        while start < len(points):
            stop, axis = start + 1, None
            while stop < len(points):
                differ = [j for j, (u, v) in enumerate(zip(points[start], points[stop])) if u != v]
                if len(differ) > 1 or (differ and axis is not None and differ[0] != axis):
                    break
                axis = differ[0] if differ else axis
                stop += 1
            self.runs.append((start, stop, axis or 0))
            start = stop
        self.outputs: dict[int, Tensor] = {}

    @property
    def shortest(self) -> int:
        return min(stop - start for start, stop, _ in self.runs)


class LinearReluLinear(nn.Module):
    """`second(relu(first(x)))` for two LinearRules, `first.relu` set; see the module doc.

    The points of a call are split into `Lines`, each run computed by one relu_line_linear.
    Where the points run in groups (PointContext.grouped), a run is computed when a group
    first needs it, kept for the call, and dropped once the groups are past it."""

    fresh_output = True

    def __init__(self, first: LinearRule, second: LinearRule) -> None:
        super().__init__()
        assert first.relu, "the first linear rule must end in the ReLU"
        self.first, self.second = first, second
        self._memory: list[Tensor] = []  # see _output_memory

    def forward(self, x: Tensor) -> Tensor:
        lines = self._lines(x) if self._applies(x) else None
        if lines is None:
            return self.second(self.first(x))
        context, rows = self.first.context, x.rows()
        flat = rows.reshape(-1, rows.shape[-1])
        w1, d1 = self.first.weight_and_directions()
        first = context.reuse(lambda: self._first_layer(flat), flat, w1, d1, owner=self.first)
        start, stop = context.active_span if context.grouped else (0, lines.coeffs.shape[0])
        pieces = []  # the parts of the runs overlapping [start, stop), in order
        for i, (begin, end, _) in enumerate(lines.runs):
            if begin < stop and end > start:
                y = lines.outputs.get(i)
                if y is None:
                    y = lines.outputs[i] = self._line(lines, i, first, flat)
                pieces.append(y[max(start, begin) - begin : min(stop, end) - begin])
                if end <= stop:  # (the groups are past it)
                    del lines.outputs[i]
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return y.reshape(stop - start, *rows.shape[:-1], y.shape[-1]).flatten(0, 1)

    def _first_layer(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(R, H) the first layer's output at the origin, (R, J, H) along each direction."""
        (w, d), b = self.first.weight_and_directions(), self.first.origin("bias")
        db = self.first.directions.get("bias")
        along = F.linear(flat, d.flatten(0, 1)).unflatten(1, d.shape[:2])
        if b is not None and db is not None:
            along = along + db
        return F.linear(flat, w, b), along

    def _line(self, lines: Lines, i: int, first: tuple[Tensor, Tensor], flat: Tensor) -> Tensor:
        """(K_i, R, O) outputs of run i: along direction `axis` from the point of its line
        whose `axis` coordinate is 0, θ0 + Σ_j≠axis c_j·d_j."""
        begin, end, axis = lines.runs[i]
        coeffs = lines.coeffs[begin:end]
        base, along = first
        (w, d), b = self.second.weight_and_directions(), self.second.origin("bias")
        db = self.second.directions.get("bias") if b is not None else None
        shift = coeffs[0].to(base.dtype).clone()
        shift[axis] = 0
        if shift.any():
            base = base + torch.einsum("j,rjh->rh", shift, along)
            w = w + torch.einsum("j,joi->oi", shift, d)
            b = b if db is None else b + shift @ db
        out = self._output_memory((end - begin, flat.shape[0], w.shape[0]), flat)
        y = relu_line_linear(base, along[:, axis], w, d[axis], b, None if db is None else db[axis], coeffs[:, axis],
                             self.second.relu, out)
        return y[:]  # (a view: while it lives, _output_memory sees its memory held)

    def _output_memory(self, shape: tuple, like: Tensor) -> Tensor:
        """Memory for a line's outputs: one of the last calls', where nothing else still holds
        any of it. Outputs of hundreds of megabytes (W1: 50 points × 1000 rows × 1024) are
        mapped fresh by glibc on every call, and touching each new page cost more than writing
        it (W1: 55 against 15 ms a batch)."""
        for kept in self._memory:
            if (tuple(kept.shape) == shape and kept.dtype == like.dtype and kept.device == like.device
                    and _sole_holder(kept) and (torch.is_inference_mode_enabled() or not kept.is_inference())):
                return kept
        kept = like.new_empty(shape)
        self._memory = [kept, *self._memory][:KEPT_OUTPUTS]
        return kept

    def _lines(self, x: Tensor) -> Lines | None:
        """The call's lines where each has MIN_POINTS_PER_LINE points and at most LINE_BYTES
        of outputs."""
        context, rows = self.first.context, x.rows()
        if context.grouped:
            lines = context.reuse(lambda: Lines(context.coeffs), context.coeffs, owner=self)
        else:
            lines = Lines(context.active_coeffs())
        longest = max(stop - start for start, stop, _ in lines.runs)
        outputs = self.second.weight_and_directions()[0].shape[0]
        if (lines.shortest < MIN_POINTS_PER_LINE
                or longest * (rows.numel() // rows.shape[-1]) * outputs * rows.element_size() > LINE_BYTES):
            return None
        return lines

    def _applies(self, x: Tensor) -> bool:
        """Rows shared by every point, float32/64 on the CPU with the compiled kernel, both
        weights moving, outside autograd and forward mode."""
        context = self.first.context
        weights = (*self.first.weight_and_directions(), *self.second.weight_and_directions())
        return (isinstance(x, SharedRows) and x.is_cpu and x.dtype in (torch.float32, torch.float64)
                and all(w is not None and w.dtype == x.dtype for w in weights) and not context.forward_mode
                and compiled("relu_line_linear", "cpu")
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, context.coeffs, *weights))))
