"""The model itself, one point at a time: the oracle that every multi-point answer is
checked against on its first call of each shape, and the fallback when they disagree.

A private copy of the user's module tree whose parameters and persistent buffers are
placeholders (`Unbuilt`: no memory, and any operation on one raises), so the user's
model is never touched. A point's weights are built one module at a time: each module's
own entries of the state right before its forward, dropped right after, so that a point
costs no full copy of the weights (a 1.28 GB state's fresh pages took longer than the
forward itself; on a large model the copy may not fit at all). A model that reads a
module's weights outside that module's forward (a tied head through
`F.linear(x, self.embedding.weight)`, `nn.MultiheadAttention`'s output projection)
touches a placeholder and raises; from then on it gets each point's full state through
torch.func.functional_call.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from mlifast.multipoint.trees import map_tensors, tensors_in
from mlifast.spaces import Span


class Unbuilt(Tensor):
    """A parameter or buffer of the private copy while no point's value is in it: the
    shape, dtype and device of the user's, no memory; any operation on it raises."""

    @staticmethod
    def __new__(cls, like: Tensor) -> Unbuilt:
        return Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                             device=like.device, requires_grad=False)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} read a weight outside its module's forward")

    def __repr__(self) -> str:  # (Tensor's repr would read the values)
        return f"Unbuilt({tuple(self.shape)}, {self.dtype}, {self.device})"


class _ModuleWeights:
    """Forward hooks on the private copy that build each module's own entries of the
    state at `coord` before its forward and drop them after (`at` sets `space` and
    `coord` for one forward only: the hooks hold no reference to the space between)."""

    def __init__(self, module: nn.Module, groups: dict[str, str]) -> None:
        self.space: Span | None = None
        self.coord: list[float] = []
        self.entries: dict[int, list[tuple[dict, str, str, Tensor]]] = {}
        self.depth: dict[int, int] = {}
        for path, m in module.named_modules(remove_duplicate=False):
            if id(m) in self.entries:
                continue
            own = [(d, name, groups[f"{path}.{name}" if path else name], t)
                   for d in (m._parameters, m._buffers) for name, t in d.items() if isinstance(t, Unbuilt)]
            if own:
                self.entries[id(m)] = own
                m.register_forward_pre_hook(self._build)
                m.register_forward_hook(self._drop, always_call=True)

    def _build(self, m: nn.Module, _args: tuple) -> None:
        if self.space is None:
            return
        depth = self.depth[id(m)] = self.depth.get(id(m), 0) + 1
        if depth == 1:  # (a module inside its own forward keeps what its first call built)
            for d, name, key, _ in self.entries[id(m)]:
                d[name] = self.space.entry_at(key, self.coord)

    def _drop(self, m: nn.Module, _args: tuple, _output: Any) -> None:
        if self.space is None:
            return
        self.depth[id(m)] -= 1
        if self.depth[id(m)] == 0:
            for d, name, _, unbuilt in self.entries[id(m)]:
                d[name] = unbuilt

    def forward(self, module: nn.Module, space: Span, coord: list[float], args: tuple, kwargs: dict) -> Any:
        """module(*args, **kwargs) at `coord`, its weights built module by module."""
        self.space, self.coord, self.depth = space, coord, {}
        try:
            out = module(*args, **kwargs)
        finally:
            self.space = None
            for own in self.entries.values():
                for d, name, _, unbuilt in own:
                    d[name] = unbuilt
        if any(isinstance(t, Unbuilt) for t in tensors_in(out)):
            raise RuntimeError("the output holds a weight itself")
        return out


class PerPointModel:
    """out[k] = model with space.state_at(coords[k]), stacked along a new leading dim."""

    def __init__(self, model: nn.Module, space: Span) -> None:
        persistent = {
            id(t) for m in model.modules() for n, t in m._buffers.items()
            if t is not None and n not in m._non_persistent_buffers_set
        } | {id(p) for p in model.parameters()}
        memo = {id(t): Unbuilt(t) for t in list(model.parameters()) + list(model.buffers()) if id(t) in persistent}
        self.module = copy.deepcopy(model, memo)
        self.space = space
        groups = alias_groups(model)
        # functional_call takes one key per tied tensor.
        self.keys = list(dict.fromkeys(groups.values()))
        self._module_weights: _ModuleWeights | None = _ModuleWeights(self.module, groups)
        self._reusing = False  # see reusing_state
        self._state: dict[str, Tensor] | None = None

    def train(self, mode: bool) -> None:
        self.module.train(mode)

    @property
    def deterministic(self) -> bool:
        """False when active dropout makes two runs differ."""
        return not any(m.training and m.p > 0 for m in self.module.modules() if isinstance(m, _DropoutNd))

    @contextmanager
    def batch_statistics(self, on: bool = True) -> Iterator[None]:
        """Inside (if `on`), the model's batch norms normalise with each batch's own
        statistics (train mode, as for the "batch" and "recompute" policies); dropout and
        everything else keep their mode. Running statistics they update are the state's."""
        norms = [m for m in self.module.modules() if isinstance(m, _BatchNorm) and not m.training] if on else []
        for m in norms:
            m.train()
        try:
            yield
        finally:
            for m in norms:
                m.eval()

    @contextmanager
    def reusing_state(self) -> Iterator[None]:
        """Inside, every point's state is written into the memory of the previous one (one
        full state held until the end, not one allocated per point: on a large model the
        fresh allocation costs more than computing the state)."""
        if self._reusing:
            yield
            return
        self._reusing = True
        try:
            yield
        finally:
            self._reusing, self._state = False, None

    def at(self, coord: Tensor, args: tuple, kwargs: dict) -> Any:
        """The model's output at one point (coord: (J,))."""
        copy_of = lambda t, _path: t.clone()  # noqa: E731 — in-place ops of the model stay here
        if self._module_weights is not None:
            try:
                return self._module_weights.forward(self.module, self.space, coord.tolist(),
                                                    map_tensors(copy_of, args), map_tensors(copy_of, kwargs))
            except Exception:  # noqa: BLE001 — a weight read outside its module, or the model's own error (again below)
                self._module_weights = None
        if self._reusing:
            state = self._state = self.space.state_at(coord.tolist(), out=self._state)
        else:
            state = self.space.state_at(coord.tolist())
        out = functional_call(self.module, {k: state[k] for k in self.keys}, map_tensors(copy_of, args),
                              map_tensors(copy_of, kwargs))
        if self._reusing:  # an output that is (a view of) a state tensor: the next point overwrites it
            held = {_storage(t) for t in state.values() if t.numel()}
            out = map_tensors(lambda t, _path: t.clone() if _may_alias(t, held) else t, out)
        return out

    def __call__(self, coords: Tensor, args: tuple, kwargs: dict) -> Any:
        with self.reusing_state():
            outputs = [self.at(c, args, kwargs) for c in coords]
        columns = list(zip(*(list(tensors_in(o)) for o in outputs)))
        position = iter(range(len(columns)))
        return map_tensors(lambda _t, _path: torch.stack(columns[next(position)]), outputs[0])


def _storage(t: Tensor) -> int | None:
    """The address of t's memory; None where it cannot be read (a functorch wrapper of
    forward-mode derivatives has no storage: then anything may alias)."""
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


def _may_alias(t: Tensor, storages: set) -> bool:
    """Whether t may share memory with one of `storages` (from _storage)."""
    mine = _storage(t)
    return mine is None or None in storages or mine in storages


def alias_groups(model: nn.Module) -> dict[str, str]:
    """State-dict key → the first key naming the same tensor (tied weights share one)."""
    first: dict[int, str] = {}
    groups = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None or name in module._non_persistent_buffers_set:
                continue
            key = f"{path}.{name}" if path else name
            groups[key] = first.setdefault(id(t), key)
    return groups


def first_disagreement(ours: Any, reference: Any, point: int, tf32: bool = False) -> str | None:
    """Where ours[point] (the multi-point output) differs from the reference output
    beyond rounding (`tf32`: see close), or None when they agree."""
    mine, theirs = list(tensors_in(ours)), list(tensors_in(reference))
    if len(mine) != len(theirs):
        return f"the output has {len(mine)} tensors, the model's {len(theirs)}"
    for i, (a, b) in enumerate(zip(mine, theirs)):
        a = a[point]
        if a.shape != b.shape:
            return f"output tensor #{i} has shape {tuple(a.shape)}, the model's {tuple(b.shape)}"
        if not close(a, b, tf32):
            scale = b.abs().max().clamp_min(1e-30) if b.numel() else 1.0
            return f"output tensor #{i} differs by {((a - b).abs().max() / scale).item():.3g} (relative)"
    return None


def rounds_float32_to_tf32(convolutions: bool, recurrent: bool = False) -> bool:
    """Whether a GPU may round float32 to TF32 (a 10-bit mantissa, like float16): in matmuls
    where the user allowed it, and in cuDNN's convolutions and recurrent layers, which
    PyTorch allows by default, for a model that has them. Reads PyTorch's fp32_precision
    settings (torch ≥ 2.9, where the old flags raise once those are set), else the
    allow_tf32 flags."""
    backends = torch.backends
    if not hasattr(backends.cuda.matmul, "fp32_precision"):
        return backends.cuda.matmul.allow_tf32 or ((convolutions or recurrent) and backends.cudnn.allow_tf32)

    def tf32(*levels) -> bool:  # the first level that is set, leaf first ("none": inherit)
        values = (getattr(level, "fp32_precision", "none") for level in levels)
        return next((value for value in values if value != "none"), "ieee") == "tf32"

    cudnn = backends.cudnn
    return (tf32(backends.cuda.matmul, backends)
            or (convolutions and tf32(getattr(cudnn, "conv", cudnn), cudnn, backends))
            or (recurrent and tf32(getattr(cudnn, "rnn", cudnn), cudnn, backends)))


def relative_tolerance(dtype: torch.dtype, tf32: bool) -> float:
    """How far (relative to the largest value) two computations of the same outputs in
    `dtype` may differ by rounding alone; `tf32`: float32 computed on a GPU that may round
    it to TF32 (W2's ResNet-20 and itself differed by 1.25e-3 on an H200)."""
    if dtype == torch.float32:
        return 1e-2 if tf32 else 1e-3
    return {torch.float64: 1e-7}.get(dtype, 5e-2)


def close(a: Tensor, b: Tensor, tf32: bool = False) -> bool:
    """Equal up to the rounding of a different summation order (never a row mix-up); `tf32`:
    on a GPU, float32 may have been rounded to TF32 (rounds_float32_to_tf32)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = relative_tolerance(a.dtype, tf32 and a.is_cuda)
    finite = torch.isfinite(b)
    scale = b[finite].abs().max().clamp_min(1e-30) if finite.any() else 1.0
    same = ((a - b).abs() <= tol * scale) | (a.isnan() & b.isnan()) | (a == b)
    return bool(same.all())
