"""A linear layer's output on rows shared by every point, kept as its products until read;
the linear layer after its ReLU then computes from them along each line of points.

On a line θ0 + c·d the first moving linear layer of an MLP sees the same rows x at every
point, so its output is affine in c: a + c·e, with a and e computed once for all points.
The linear layer after its ReLU then needs, at each point, relu(a + c_k·e)·(W + c_k·D)ᵀ:
`mlifast.ops.relu_line_linear` computes that for all K points from one GEMM plus the
units that switch on or off between consecutive points, not K GEMMs (W1: the MLI paper's
MNIST MLP, whose 1024×1024 second layer is most of its FLOPs).

`LinearRule` returns a `PendingLine` for rows shared by every point; a ReLU (function,
method or module, in place or not), a LeakyReLU and dropout in eval mode keep it pending;
the next `LinearRule` computes from it with `relu_line_linear` (`linear_after`); anything
else combines the products into the layer's output first (`materialize`), as before. So
it takes any model written with Linear and (Leaky)ReLU, nn.Sequential or its own forward."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mlifast._extension import compiled
from mlifast.multipoint.pending import RELU, RELU_IN_PLACE, Pending
from mlifast.ops import multipoint_combine, relu_line_linear

# A line's outputs are computed at once, from its first point's GEMMs: 4 times the FLOPs
# of one point's. Below this many points a line is not worth it (the two rules run): on
# the 2-core CI CPU (benchmarks/relu_line_crossover.py: float32, 1024 → 1024, 64 and 1000
# rows) the op took the two rules' time at 6 points, 0.8× at 8 (1.1× in another run) and
# 0.5–0.6× at 12.
MIN_POINTS_PER_LINE = 8
# Nor above this many bytes of a line's outputs (K × rows × outputs).
LINE_BYTES = 512 << 20
# Output memory kept on each rule for reuse between calls, newest first (_output_memory):
# up to 4 runs' outputs and two runs' worth of bytes (a group of points spanning the end of
# one run and the start of the next holds both: make demo's two lines of 50 points × 2000
# rows, 410 MB each, took 3.9 s a test-set pass with one of them kept, 3.0 s with both).
KEPT_OUTPUTS, KEPT_OUTPUT_BYTES = 4, 2 * LINE_BYTES


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
    one run each. And the runs' outputs computed so far (`outputs`), which parts of them
    went to which group (`handed`) and how many of each run's points are still to go
    (`left`: its outputs are dropped at 0, whatever order the groups run in)."""

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
        self.handed: set[tuple[int, int]] = set()  # (run, group start) of parts handed out
        self.left = [stop - start for start, stop, _ in self.runs]

    @property
    def shortest(self) -> int:
        return min(stop - start for start, stop, _ in self.runs)


class PendingLine(Pending):
    """(K_active·B, …, O) output of a linear rule on rows shared by every point: its
    products with the origin's weight (R, O) and with the J directions (R, J·O), combined
    for the active points only when read (R = B·…, rows (B, …, I)).

    Made by `LinearRule` outside autograd and forward mode, on float32/64 CPU rows with
    the compiled relu_line_linear; `slope`: the activation applied to it (joined by
    fuse_activations or applied since), None for none, 0.0 for a ReLU, α for a LeakyReLU.
    """

    @staticmethod
    def __new__(cls, rule, rows_shape: tuple, products: tuple[Tensor, Tensor],
                slope: Optional[float]) -> "PendingLine":
        base = products[0]
        k = rule.context.num_active
        shape = (k * rows_shape[0], *rows_shape[1:-1], base.shape[-1])
        t = Tensor._make_wrapper_subclass(cls, shape, dtype=base.dtype, device=base.device)
        t._rule, t._rows_shape, t._products, t._slope, t._value = rule, rows_shape, products, slope, None
        t._coeffs = rule.context.active_coeffs()
        return t

    def __init__(self, *args, **kwargs) -> None:
        pass

    @staticmethod
    def applies(rule, rows: Tensor) -> bool:
        """Whether `rule` (a LinearRule) returns a PendingLine for these shared rows."""
        context, (w, d) = rule.context, rule.weight_and_directions()
        return (d is not None and rows.is_cpu and rows.dtype in (torch.float32, torch.float64) and w.dtype == rows.dtype
                and not context.forward_mode and compiled("relu_line_linear", "cpu")
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (rows, w, d, context.coeffs))))

    @property
    def computed(self) -> bool:
        return self._value is not None

    def materialize(self) -> Tensor:
        """The layer's output (through the activation where one joined), computed once."""
        if self._value is None:
            (_, d), b = self._rule.weight_and_directions(), self._rule.origin("bias")
            db = self._rule.directions.get("bias") if b is not None else None
            base, along = self._products
            y = multipoint_combine(base, along.unflatten(1, d.shape[:2]), b, db, self._coeffs.to(base.dtype),
                                   self._slope == 0.0)
            if self._slope:
                y = F.leaky_relu(y, self._slope, inplace=True)
            self._value = y.reshape(y.shape[0], *self._rows_shape[:-1], y.shape[-1]).flatten(0, 1)
            self._products = None
        return self._value

    def linear_after(self, rule) -> Optional[Tensor]:
        """`rule` (a LinearRule) applied to this output, from relu_line_linear along each line
        of the call's points (`Lines`); None where that does not apply: not through a
        (Leaky)ReLU, already computed, a weight that does not move or another dtype, lines
        too short."""
        w, d = rule.weight_and_directions()
        if self._slope is None or self.computed or d is None or w.dtype != self.dtype:
            return None
        return _linear_along_lines(self, rule)

    @classmethod
    def _join(cls, func, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """A ReLU, a LeakyReLU and dropout in eval mode keep it pending."""
        pending = args[0] if args and isinstance(args[0], PendingLine) and not args[0].computed else None
        if pending is None:
            return None
        slope, in_place = _activation_slope(func, args, kwargs)
        if slope is not None and (pending._slope is None or pending._slope == slope == 0.0):
            if in_place:  # (self is the activation's output from now on)
                pending._slope = slope
                return pending
            return PendingLine(pending._rule, pending._rows_shape, pending._products, slope)
        if func is F.dropout and not _dropout_training(args, kwargs):
            return pending
        return None


def _activation_slope(func, args: tuple, kwargs: dict) -> tuple[Optional[float], bool]:
    """(negative slope, in place) of a ReLU (0.0) or LeakyReLU call; (None, False) for
    anything else."""
    if func in RELU and len(args) == 1 and set(kwargs) <= {"inplace"}:
        return 0.0, func in RELU_IN_PLACE or bool(kwargs.get("inplace", False))
    if func is F.leaky_relu and len(args) <= 3 and set(kwargs) <= {"negative_slope", "inplace"}:
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return float(slope), bool(args[2] if len(args) > 2 else kwargs.get("inplace", False))
    return None, False


def _dropout_training(args: tuple, kwargs: dict) -> bool:
    """F.dropout(input, p=0.5, training=True, inplace=False)'s `training`."""
    return bool(args[2] if len(args) > 2 else kwargs.get("training", True))


def _linear_along_lines(pending: PendingLine, rule) -> Optional[Tensor]:
    """(K_active·B, …, O) outputs of `rule` on relu(pending): each run of the call's `Lines`
    by one relu_line_linear. Where the points run in groups (PointContext.grouped), a run is
    computed when a group first needs it, kept for the call, and dropped once every group
    has had its part. None where a run is shorter than MIN_POINTS_PER_LINE or its outputs take
    more than LINE_BYTES."""
    context, first = rule.context, pending._rule
    rows = 1
    for size in pending._rows_shape[:-1]:
        rows *= size
    outputs = rule.weight_and_directions()[0].shape[0]
    if context.grouped:  # (one Lines per rule and input for the call: the same products every group)
        lines = context.reuse(lambda: Lines(context.coeffs), context.coeffs, *pending._products, owner=rule)
    else:
        lines = Lines(pending._coeffs)
    longest = max(stop - start for start, stop, _ in lines.runs)
    if lines.shortest < MIN_POINTS_PER_LINE or longest * rows * outputs * pending.element_size() > LINE_BYTES:
        return None
    base, along = pending._products
    (_, d1), b1 = first.weight_and_directions(), first.origin("bias")
    db1 = first.directions.get("bias") if b1 is not None else None
    # the first layer's output at the origin (R, H) and along each direction (R, J, H)
    a_e = context.reuse(lambda: (base if b1 is None else base + b1,
                                 along.unflatten(1, d1.shape[:2]) + (0 if db1 is None else db1)),
                        base, along, owner=first)
    start, stop = context.active_span if context.grouped else (0, lines.coeffs.shape[0])
    pieces = []  # the parts of the runs overlapping [start, stop), in order
    for i, (begin, end, _) in enumerate(lines.runs):
        if begin < stop and end > start:
            if (i, start) in lines.handed:
                # a second reader of the same part (the rule applied to the same input twice)
                # gets its own: the first may have written into its part already
                y = _run_outputs(rule, lines, i, a_e, pending._slope)
            else:
                y = lines.outputs.get(i)
                if y is None:
                    y = lines.outputs[i] = _run_outputs(rule, lines, i, a_e, pending._slope)
                lines.handed.add((i, start))
                lines.left[i] -= min(stop, end) - max(start, begin)
                if lines.left[i] == 0:  # (every group has had its part)
                    del lines.outputs[i]
            pieces.append(y[max(start, begin) - begin : min(stop, end) - begin])
    y = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return y.reshape(stop - start, *pending._rows_shape[:-1], y.shape[-1]).flatten(0, 1)


def _run_outputs(rule, lines: Lines, i: int, first: tuple[Tensor, Tensor], slope: float) -> Tensor:
    """(K_i, R, O) outputs of `rule` on run i of `lines`: along direction `axis` from the
    point of its line whose `axis` coordinate is 0, θ0 + Σ_j≠axis c_j·d_j. `first`: the
    activation's input at the origin (R, H) and along each direction (R, J, H); `slope`:
    the activation's negative slope (0.0: a ReLU)."""
    begin, end, axis = lines.runs[i]
    coeffs = lines.coeffs[begin:end]
    base, along = first
    (w, d), b = rule.weight_and_directions(), rule.origin("bias")
    db = rule.directions.get("bias") if b is not None else None
    shift = coeffs[0].to(base.dtype).clone()
    shift[axis] = 0
    if shift.any():
        base = base + torch.einsum("j,rjh->rh", shift, along)
        w = w + torch.einsum("j,joi->oi", shift, d)
        b = b if db is None else b + shift @ db
    out = _output_memory(rule, (end - begin, base.shape[0], w.shape[0]), base)
    y = relu_line_linear(base, along[:, axis], w, d[axis], b, None if db is None else db[axis], coeffs[:, axis],
                         rule.relu, slope, out=out)
    return y[:]  # (a view: while it lives, _output_memory sees its memory held)


def _output_memory(rule, shape: tuple, like: Tensor) -> Tensor:
    """Memory for a run's outputs: one of the last calls' (kept on the rule, `line_outputs`),
    where nothing else still holds any of it. Outputs of hundreds of megabytes (W1: 50
    points × 1000 rows × 1024) are mapped fresh by glibc on every call, and touching each
    new page cost more than writing it (W1: 55 against 15 ms a batch)."""
    kept_outputs = rule.line_outputs
    for kept in kept_outputs:
        if (tuple(kept.shape) == shape and kept.dtype == like.dtype and kept.device == like.device
                and _sole_holder(kept) and (torch.is_inference_mode_enabled() or not kept.is_inference())):
            return kept
    kept = like.new_empty(shape)
    rule.line_outputs, total = [kept], kept.numel() * kept.element_size()
    for older in kept_outputs[: KEPT_OUTPUTS - 1]:
        total += older.numel() * older.element_size()
        if total > KEPT_OUTPUT_BYTES:
            break
        rule.line_outputs.append(older)
    return kept
