"""The state every multi-point layer of one model reads while it runs.

Activations of K points travel folded into the batch dimension, point-major: rows
[k·B, (k+1)·B) of a (K·B, …) tensor belong to point k. `PointContext` says which points
the rows currently belong to (all K, or a single one inside the generic per-point path)
and the batch-norm mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from mlifast.multipoint.trees import tensors_in
from mlifast.ops import multipoint_linear, multipoint_linear_reference

# Bytes of per-point parameter values (`kept_at_every_point`) kept between calls of the
# model: every batch and group of a pass reads the same ones. ResNet-20 keeps all of its
# at 50 points in 54 MB; a larger model keeps what fits and forms the rest per call.
KEPT_POINT_VALUES_BYTES = 64 << 20


def _linear_output_zeros(x: Tensor, w: Tensor, b, w_dirs, b_dirs, c: Tensor, relu: bool = False) -> Tensor:
    """Zeros of multipoint_linear(x, w, b, w_dirs, b_dirs, c, relu)'s output, (K, R, O)."""
    return x.new_zeros(c.shape[0], x.shape[-2], w.shape[0])


@dataclass
class PointContext:
    """Coordinates of the points in flight and how batch norm behaves.

    coeffs: (K, J) coordinates of every point of the current pass, in the compute dtype.
    active: (K_active,) indices into `coeffs` of the points whose rows are folded in the
        activations right now (arange(K) outside the generic path).
    batch_dim: the dimension holding the (K·B) rows for row-wise layers (linear,
        embedding, layer/RMS norm, RNN inputs); channel layers (conv, batch/group norm)
        always have it in dim 0.
    forward_mode: True while the coefficients carry forward-mode tangents
        (analysis.geometry): rules then keep to operations with forward-mode derivatives.
    flat_indices_shared: True when 1-D index tensors of embeddings are the same for every
        example whatever their length (nanoGPT's position ids torch.arange(T), with T a
        multiple of K_active·B); set by the first-call check when reading them as rows
        disagrees with the model. `flat_indices_fit_rows` records that a call met such a
        tensor whose length fits the rows (read as rows, or shared where it would have been).
    grouped: True while one call of the model runs its points in several groups
        (MultiPointModel.points_per_group); rules may then keep what does not depend on
        the points, computed from rows shared by every point, for the next group (`reuse`).
    defer_pending: whether per-point convolutions and batch norms on the CPU may return
        their output pending (multipoint.pending), to join the batch norm, addition and
        ReLU after them; False once a model wrote into a pending result's input.
    sizes_only: True while a probe measures activation sizes (chunking.bytes_per_point):
        linear layers at points then give zeros of their output's shape, uncomputed (W3's
        probe read all 2.55 GB of weights and directions for values nobody looks at).
    glue_all_at_once: whether generic modules run their forward once for all points, their
        own tensors as PointValues (generic.py); only once a first-call check found that it
        agrees with the model (a module's own code may mix the rows of its batch, which then
        holds every point's), so never in a model whose dropout makes checks impossible.
    bn_mode: "running" — running statistics of each point (interpolated or recomputed);
        "batch" — per-point batch statistics; "collect" — per-point batch statistics,
        also accumulated as running statistics (the "recompute" policy's pass).
    """

    coeffs: Tensor
    active: Tensor = field(init=False)
    active_span: tuple[int, int] = field(init=False)  # active == arange(*active_span): set by select_points
    bn_mode: str = "running"
    batch_size: int = 0  # B, examples per point in the current call
    batch_dim: int = 0  # where row-wise layers (linear, embedding, layer norm) find the batch
    forward_mode: bool = False
    flat_indices_shared: bool = False
    flat_indices_fit_rows: bool = False
    grouped: bool = False
    defer_pending: bool = True
    sizes_only: bool = False
    glue_all_at_once: bool = False
    _kept: dict = field(default_factory=dict, repr=False)
    _active_coeffs: tuple | None = field(default=None, repr=False)
    _indices: Tensor | None = field(default=None, repr=False)
    _every_point: dict = field(default_factory=dict, repr=False)  # key → (stamp, (K, …) value)
    _every_point_for: tuple | None = field(default=None, repr=False)  # (coeffs, version, bytes held)

    def __post_init__(self) -> None:
        self.select_points(0, self.coeffs.shape[0])

    def select_points(self, start: int, stop: int) -> None:
        """Points [start, stop) of `coeffs` are the active ones from now on."""
        k, device = self.coeffs.shape[0], self.coeffs.device
        if self._indices is None or self._indices.shape[0] != k or self._indices.device != device:
            self._indices = torch.arange(k, device=device)
        self.active, self.active_span = self._indices[start:stop], (start, stop)

    def reuse(self, compute: Callable[[], Any], *tensors: Tensor, owner: Any = None, key: Any = None) -> Any:
        """compute(), computed once per call of the model for the same `tensors` (and
        `owner`, and hashable `key`) while its points run in groups (`grouped`); otherwise
        simply compute().

        `tensors` are everything the result depends on besides `owner` (the module whose
        configuration it depends on, if any) and `key` (a function and its other
        arguments): rows shared by every point, weights. They are matched by memory and
        version, and held until `forget`, so that no other tensor can take their memory
        meanwhile. A kept result written into since (an activation with inplace=True on
        it) is computed again.
        """
        if not self.grouped:
            return compute()
        identities = tuple(_identity(t) for t in tensors)
        if None in identities:
            return compute()
        key = (id(owner), key, identities)
        kept = self._kept.get(key)
        if kept is None or _versions_in(kept[1]) != kept[2]:
            value = compute()
            kept = self._kept[key] = (tensors, value, _versions_in(value))
        return kept[1]

    def forget(self) -> None:
        """Drop what `reuse` kept (at the end of each call of the model)."""
        self._kept.clear()

    def kept_at_every_point(self, key: Any, compute: Callable[[Tensor], Tensor], nbytes: int,
                            *tensors: Tensor) -> Tensor | None:
        """compute(coeffs): a (K, …) value of `nbytes` bytes at every point, kept while
        `coeffs` and `tensors` (all it depends on) stay the same objects, unwritten, and
        the value unwritten, within KEPT_POINT_VALUES_BYTES for all keys. None where it is
        not kept (over the budget, forward mode, a graph for backward, tensors without
        version counters): the caller computes it for the active points instead."""
        version = _version(self.coeffs)
        if self.forward_mode or version is None or (
                torch.is_grad_enabled() and any(t.requires_grad for t in (self.coeffs, *tensors))):
            return None
        held = self._every_point_for
        if held is None or held[0] is not self.coeffs or held[1] != version:
            self._every_point.clear()
            held = self._every_point_for = (self.coeffs, version, 0)
        stamp = tuple(_version(t) for t in tensors)
        kept = self._every_point.get(key)
        if kept is not None and kept[0] == (*stamp, _version(kept[1])):
            return kept[1]
        if kept is not None or None in stamp or held[2] + nbytes > KEPT_POINT_VALUES_BYTES:
            return None  # (a kept value gone stale stays counted: stale values are rare)
        value = compute(self.coeffs)
        self._every_point[key] = ((*stamp, _version(value)), value)
        self._every_point_for = (self.coeffs, version, held[2] + nbytes)
        return value

    def may_defer(self, *tensors: Tensor | None) -> bool:
        """Whether a result computed from `tensors` may stay pending (multipoint.pending):
        not in forward mode or under autograd (it would bypass them), nor for inference
        tensors (no version counter shows a write into its input), nor once the model wrote
        into a pending result's input (`defer_pending`)."""
        present = [t for t in tensors if t is not None]
        return self.defer_pending and not self.forward_mode and not any(t.is_inference() for t in present) and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in present))

    def of_active(self, every: Tensor) -> Tensor:
        """(K_active, …) view of a (K, …) value at every point: the active points' rows."""
        start, stop = self.active_span
        return every[start:stop]

    @property
    def linear(self) -> Callable[..., Tensor]:
        """The multi-point linear operation: the compiled one, or in forward mode its
        pure-PyTorch reference (`sizes_only`: zeros of its output's shape)."""
        if self.sizes_only:
            return _linear_output_zeros
        return multipoint_linear_reference if self.forward_mode else multipoint_linear

    @property
    def num_active(self) -> int:
        return self.active_span[1] - self.active_span[0]

    def rows_dim(self, t: Tensor, feature_dims: int = 1) -> int | None:
        """The dimension of `t` holding the K_active·B folded rows, for row-wise layers.

        `batch_dim` when its size fits; otherwise the one leading dimension (all but the
        last `feature_dims`) whose size is a multiple of K_active·B — a model that
        transposes internally, e.g. an embedding fed tokens.t(). None when no dimension
        fits, or when `t` has size 1 at `batch_dim` (broadcast along the batch): `t` is
        the same for every example (e.g. position ids of shape (1, T), whatever T).
        Ambiguity is an error.
        """
        rows = self.num_active * self.batch_size
        if rows > 1 and self.batch_dim < t.dim() - feature_dims and t.shape[self.batch_dim] == 1:
            return None
        dims = range(t.dim() - feature_dims)
        fits = [d for d in dims if t.shape[d] > 0 and t.shape[d] % rows == 0]
        if self.batch_dim in fits:
            return self.batch_dim
        if len(fits) <= 1:
            return fits[0] if fits else None
        raise ValueError(
            f"mlifast: cannot tell which dimension of a tensor of shape {tuple(t.shape)} holds the "
            f"{self.num_active} points × {self.batch_size} examples (candidates: {fits or 'none'}); "
            "pass batch_dim= to interpolate/evaluate"
        )

    def active_coeffs(self) -> Tensor:
        """(K_active, J) coordinates of the points whose rows are in flight (kept while
        `coeffs` stays the same object, unwritten, and the same points active: every rule of a
        call reads them)."""
        kept, version = self._active_coeffs, _version(self.coeffs)
        if (kept is None or kept[0] is not self.coeffs or kept[1] != self.active_span or version is None
                or kept[2] != version):
            start, stop = self.active_span
            kept = self._active_coeffs = (self.coeffs, self.active_span, version, self.coeffs[start:stop].clone())
        return kept[3]

    @contextmanager
    def only_point(self, k: int) -> Iterator[None]:
        """Within the block, activations hold the rows of point `active[k]` alone."""
        saved = self.active_span
        self.select_points(saved[0] + k, saved[0] + k + 1)
        try:
            yield
        finally:
            self.select_points(*saved)


def _version(t: Tensor) -> int | None:
    """t's version counter (bumped by every in-place write); None where it has none."""
    try:
        return t._version
    except (RuntimeError, NotImplementedError):
        return None


def _versions_in(value: Any) -> tuple:
    """Memory and version of the tensors in a nested structure (a result `reuse` keeps)."""
    return tuple(_identity(t) for t in tensors_in(value))


def _identity(t: Tensor) -> tuple | None:
    """Memory, layout and version of a tensor: equal for two live tensors only if they
    hold the same values. None for tensors without a version counter (inference mode)."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype, t.device, version)


def fold(t: Tensor, points: int, dim: int = 0) -> Tensor:
    """(…, K·B, …) with K·B at `dim` → (K, …, B, …)."""
    if t.dim() <= dim or t.shape[dim] % points:
        raise ValueError(
            f"mlifast: expected a tensor whose dimension {dim} holds {points} points' rows "
            f"(a multiple of {points}), got shape {tuple(t.shape)}"
        )
    return t.unflatten(dim, (points, t.shape[dim] // points)).movedim(dim, 0)


def rows_for_every_example(per_point: Tensor, batch: int) -> Tensor:
    """(K, …) outputs of an input shared by every example → (K·B, …) rows, point-major.
    A leading broadcast dim of size 1 becomes the B rows; otherwise one is added."""
    if per_point.dim() < 2 or per_point.shape[1] != 1:
        per_point = per_point.unsqueeze(1)
    return per_point.expand(per_point.shape[0], batch, *per_point.shape[2:]).flatten(0, 1)


def unfold(t: Tensor, dim: int = 0) -> Tensor:
    """(K, …, B, …) → (…, K·B, …) with K·B at `dim`; the inverse of fold."""
    return t.movedim(0, dim).flatten(dim, dim + 1)
