"""The model itself, one point at a time: the oracle that every multi-point answer is
checked against on its first call of each shape, and the fallback when they disagree.

A private copy of the user's module tree whose parameters and persistent buffers are
meta tensors (no memory); each point's state from the space is supplied with
torch.func.functional_call, so the user's model is never touched. Outside autograd the
large moving weights of torch's own layers are formed only while their layer runs
(`FORMED_PER_MODULE`): a reference point then holds about one layer's weights beside the
small rest of the state, not a copy of the whole model (W3: 1.2 GB).
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from mlifast.multipoint.module_copy import copy_module_tree
from mlifast.multipoint.rule import forward_is_inherited
from mlifast.multipoint.trees import map_tensors, tensors_in
from mlifast.multipoint.unhandled import UnhandledParameterError, UnhandledTensor
from mlifast.ops._checks import transformed
from mlifast.spaces import Span

# Layers whose moving weights of at least FORMED_PER_MODULE_MIN_BYTES, each its own tensor
# (not tied), a reference point forms just before the layer runs and drops after: torch's
# own layers, which read them in their own forward. Elsewhere such a weight is a
# `_FormedElsewhere`, which refuses computation: a parent reading it makes the point run
# again with the whole state.
FORMED_PER_MODULE = (nn.Linear, nn.Bilinear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                     nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FORMED_PER_MODULE_MIN_BYTES = 1 << 18
# Parents whose forward reads their layers' weights itself (an attention its out_proj's), or
# asks whether they are plain tensors to choose its path (the transformer layers' fast path).
READ_BY_PARENT = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class _FormedElsewhere(UnhandledTensor):
    """A weight formed per module, outside its module's forward: refuses computation (as
    UnhandledTensor) and records that it did in `refusals`, shared with its PerPointModel
    (the model might catch the error); its `.data` alike. Its values are NaN: a read that
    bypasses torch's function dispatch (TorchScript, a C++ extension) makes NaN outputs,
    for which PerPointModel runs the point again with the whole state."""

    refusals: list

    @staticmethod
    def __new__(cls, like: Tensor, owner: str, kind: str, refusals: list) -> "_FormedElsewhere":
        nan = _nan(like.dtype, like.device).expand(like.shape)
        t = UnhandledTensor.__new__(cls, nan, owner, kind)
        t.refusals = refusals
        return t

    def __init__(self, like: Tensor, owner: str, kind: str, refusals: list) -> None:
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        formed = next(t for t in tensors_in((args, kwargs)) if isinstance(t, _FormedElsewhere))
        try:
            out = super().__torch_function__(func, types, args, kwargs)
        except UnhandledParameterError:
            formed.refusals.append(func)
            raise
        if type(out) is UnhandledTensor:  # (its .data)
            out = _FormedElsewhere(out, out.owner, out.kind, formed.refusals)
        return out


@functools.lru_cache(maxsize=None)
def _nan(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-d NaN that the placeholders expand (one made per dtype and device, not per
    weight: on a GPU each is a launch)."""
    return torch.full((), float("nan"), dtype=dtype, device=device)


class _Forming:
    """What the hooks of the layers whose weights are formed per module read: the point
    they form them at (None: the whole state is given), and the refusals of their
    `_FormedElsewhere`s since the point began."""

    def __init__(self, space: Span) -> None:
        self.space, self.point, self.refusals = space, None, []
        self.placeholders: list[tuple[nn.Module, str, Tensor]] = []  # (layer, name, its _FormedElsewhere)

    def restore_placeholders(self) -> None:
        for module, name, placeholder in self.placeholders:
            module._parameters[name] = placeholder

    def formed(self, own: list, module: nn.Module, _args: tuple) -> None:
        if self.point is not None:
            values = self.space.state_at(self.point, keys=[key for _, key, _ in own])
            for name, key, _ in own:
                module._parameters[name] = values[key]

    def dropped(self, own: list, module: nn.Module, _args: tuple, _output: Any) -> None:
        if self.point is not None:
            for name, _, placeholder in own:
                module._parameters[name] = placeholder


class PerPointModel:
    """out[k] = model with space.state_at(coords[k]), stacked along a new leading dim."""

    def __init__(self, model: nn.Module, space: Span) -> None:
        named = _named_tensors(model)
        persistent = {id(t) for _, t, kept in named if kept}
        memo = {id(t): torch.empty_like(t, device="meta") for _, t, _ in named if id(t) in persistent}
        self.module = copy_module_tree(model, memo)
        self.space = space
        groups = _alias_groups(named)
        self.keys = list(dict.fromkeys(groups.values()))  # (one per tied tensor)
        # Every other name of those tensors (a non-persistent buffer's too), given the same
        # value: functional_call then need not find the ties itself (a walk of the model
        # per point, a sixth of a small transformer's reference point).
        key_of = {id(t): groups[name] for name, t, kept in named if kept}
        self._aliases = [(name, key_of[id(t)]) for name, t, _ in named if key_of.get(id(t), name) != name]
        self._reusing = False  # see reusing_state
        self._device_type = next(iter(space.origin.values())).device.type
        self._state: dict[str, Tensor] | None = None
        self._forming = _Forming(space)  # (the hooks hold it, not this object: no reference cycle)
        self._per_module = self._form_per_module(space, groups)  # keys formed while their layer runs
        self._rest_keys = [k for k in self.keys if k not in self._per_module]

    def _form_per_module(self, space: Span, groups: dict[str, str]) -> set[str]:
        """Puts a `_FormedElsewhere` in place of each weight formed per module (see
        FORMED_PER_MODULE) in the copy, with hooks on its layer that form it at the point
        `_forming.point` and drop it; returns their keys. Not for the layers of
        READ_BY_PARENT."""
        origin, formed = space.origin, set()
        uses = Counter(groups.values())
        aliased = {key for _, key in self._aliases}
        modules = list(self.module.named_modules())
        read_by_parent = {id(child) for _, m in modules if isinstance(m, READ_BY_PARENT) for child in m.children()}
        for path, module in modules:
            if (not isinstance(module, FORMED_PER_MODULE) or id(module) in read_by_parent
                    or not any(forward_is_inherited(module, cls) for cls in FORMED_PER_MODULE)):
                continue
            own = []
            for name, p in module._parameters.items():
                key = f"{path}.{name}" if path else name
                if (p is not None and groups.get(key) == key and uses[key] == 1 and key not in aliased
                        and not space.is_frozen(key)
                        and p.numel() * p.element_size() >= FORMED_PER_MODULE_MIN_BYTES):
                    placeholder = _FormedElsewhere(origin[key], key, type(module).__name__, self._forming.refusals)
                    module._parameters[name] = placeholder
                    own.append((name, key, placeholder))
                    self._forming.placeholders.append((module, name, placeholder))
            if own:
                module.register_forward_pre_hook(functools.partial(self._forming.formed, own), prepend=True)
                module.register_forward_hook(functools.partial(self._forming.dropped, own), always_call=True)
                formed.update(key for _, key, _ in own)
        return formed

    def train(self, mode: bool) -> None:
        self.module.train(mode)

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
        """Inside, on the CPU, every point's state is written into the memory of the
        previous one (one full state held until the end, not one allocated per point: on a
        large model fresh pages cost more than computing the state). On a GPU the caching
        allocator makes fresh memory free, and `state_at` then forms the state in a few
        foreach launches rather than one per tensor."""
        if self._reusing or self._device_type != "cpu":
            yield
            return
        self._reusing = True
        try:
            yield
        finally:
            self._reusing, self._state = False, None

    def at(self, coord: Tensor, args: tuple, kwargs: dict) -> Any:
        """The model's output at one point (coord: (J,)). Every tensor it reads is formed
        for the point (a model may write into them), the large weights of its layers per
        layer where that holds (see FORMED_PER_MODULE)."""
        c = coord.tolist()
        forming = self._forming
        if self._per_module and not torch.is_grad_enabled() and not transformed(*tensors_in((args, kwargs))):
            del forming.refusals[:]
            forming.point = c
            try:
                out = self._run(self._state_at(c, self._rest_keys), args, kwargs)
            except Exception:  # noqa: BLE001 — a weight read outside its layer, or the model's own error: below
                out = None
            finally:
                forming.point = None
                forming.restore_placeholders()  # (after an interrupt too: forward hooks run on exceptions only)
            if out is not None and any(isinstance(t, UnhandledTensor) for t in tensors_in(out)):
                forming.refusals.append("returned")  # (a layer's weight itself, not computed with)
            if not forming.refusals and out is not None and _finite(out):
                return out
            whole = self._run(self._state_at(c, self.keys), args, kwargs)
            if forming.refusals or out is not None and _finite(whole):  # (NaN from a placeholder read)
                self._per_module = set()  # (a parent reads its layer's weight: the whole state from now on)
                self._rest_keys = self.keys
            return whole
        return self._run(self._state_at(c, self.keys), args, kwargs)

    def _state_at(self, c: list[float], keys: list[str]) -> dict[str, Tensor]:
        """The entries `keys` at point c: on the CPU within reusing_state, in the memory of
        the previous point's."""
        if not self._reusing:
            return self.space.state_at(c, keys=keys)
        self._state = self.space.state_at(c, out=self._state, keys=keys)
        return self._state

    def _run(self, state: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
        copy_of = lambda t, _path: t.clone()  # noqa: E731 — in-place ops of the model stay here
        given = state
        if self._aliases:
            given = {**state, **{name: state[key] for name, key in self._aliases if key in state}}
        out = functional_call(self.module, given, map_tensors(copy_of, args), map_tensors(copy_of, kwargs),
                              tie_weights=False)
        if state is self._state:  # an output viewing a state tensor: the next point overwrites it
            held = {_storage(t) for t in state.values() if t.numel()}
            out = map_tensors(lambda t, _path: t.clone() if _may_alias(t, held) else t, out)
        return out

    def __call__(self, coords: Tensor, args: tuple, kwargs: dict) -> Any:
        with self.reusing_state():
            outputs = [self.at(c, args, kwargs) for c in coords]
        columns = list(zip(*(list(tensors_in(o)) for o in outputs)))
        position = iter(range(len(columns)))
        return map_tensors(lambda _t, _path: torch.stack(columns[next(position)]), outputs[0])


def _finite(out: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors_in(out) if t.is_floating_point() or t.is_complex())


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
    return _alias_groups(_named_tensors(model))


def _alias_groups(named: list[tuple[str, Tensor, bool]]) -> dict[str, str]:
    first: dict[int, str] = {}
    return {name: first.setdefault(id(t), name) for name, t, kept in named if kept}


def _named_tensors(model: nn.Module) -> list[tuple[str, Tensor, bool]]:
    """(name, tensor, whether the state dict keeps it) for every parameter and buffer of
    `model`, under each of its names (tied ones under every name), in state-dict order."""
    named = []
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        named += [(prefix + name, t, True) for name, t in module._parameters.items() if t is not None]
        named += [(prefix + name, t, name not in module._non_persistent_buffers_set)
                  for name, t in module._buffers.items() if t is not None]
    return named


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
    if not b.numel():
        return True
    largest = max(abs(v.item()) for v in torch.aminmax(b))
    if math.isfinite(largest) and bool(((a - b).abs_() <= tol * max(largest, 1e-30)).all()):
        return True  # (three passes over a language model's logits; NaNs and infinities below)
    scale = torch.where(torch.isfinite(b), b.abs(), 0).amax().clamp_min(1e-30).item()
    return bool(torch.isclose(a, b, rtol=0, atol=tol * scale, equal_nan=True).all())  # (equal infinities too)
