"""The base of every multi-point layer: a module that answers for the K points in flight.

A rule wraps one module of the user's model (`inner`) whose own parameters or floating
buffers move in the space. It holds each such tensor's origin value (O) and its stacked
directions (J, …), and computes the module's output for all active points from
activations folded point-major in the batch dimension (see context.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mlifast.multipoint.context import PointContext, fold
from mlifast.multipoint.shared import SharedRows


class MultiPointRule(nn.Module):
    """Base class. Subclasses implement `forward` for (K_active·B, …) activations.

    Args:
        inner: the module of the copied model (its moving tensors are UnhandledTensors).
        path: the module's qualified name in the model, for messages.
        origins: name → origin value of each of the module's own floating tensors.
        directions: name → (J, *shape) directions of those that move (others absent).
        context: the PointContext shared by all rules of one model.
    """

    # True where forward always returns a new tensor that nothing else holds, so that an
    # activation module right after the rule may work in place (model.fuse_activations).
    fresh_output: bool = False

    def __init__(self, inner: nn.Module, path: str, origins: dict[str, Tensor],
                 directions: dict[str, Tensor], context: PointContext) -> None:
        super().__init__()
        self.inner = inner
        self.path = path
        self.origins = origins
        self.directions = directions
        self.context = context
        self._made: dict = {}  # what `_made_once` made: per_point's flat views, a wide form's zeros

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Parents may read the wrapped module's attributes (e.g. `self.fc.out_features`).
            return getattr(self._modules["inner"], name)

    def split_points(self, x: Tensor, dim: int) -> Tensor:
        """(K_active, …, B, …) view of activations x whose K·B rows sit at `dim`; rows
        shared by every point (dim 0) are expanded without a copy."""
        k = self.context.num_active
        if isinstance(x, SharedRows):
            rows = x.rows()
            return rows.unsqueeze(0).expand(k, *rows.shape)
        return fold(x, k, dim)

    def moves(self, name: str) -> bool:
        return name in self.directions

    def origin(self, name: str) -> Optional[Tensor]:
        return self.origins.get(name)

    def per_point(self, name: str) -> Optional[Tensor]:
        """(K_active, *shape) value of a (small) tensor at each active point, or None."""
        origin = self.origins.get(name)
        if origin is None:
            return None
        if name not in self.directions:
            return origin.unsqueeze(0).expand(self.context.num_active, *origin.shape)
        every = self._kept_at_every_point(name)
        return self._at(name, self.context.active_coeffs()) if every is None else self.context.of_active(every)

    def point_state(self, k: int) -> dict[str, Tensor]:
        """Every own floating tensor of `inner` at active point k (for functional_call): a
        moving one from its value at every point where that is kept, so that every batch and
        group of a pass reads the same tensors (a GRU 5 % faster: oneDNN's per-point calls
        with weights formed afresh, an LSTM's 1.37–1.49 ms, with the same ones again
        1.18–1.26), else formed for this point alone."""
        state = {}
        for name, origin in self.origins.items():
            if name in self.directions:
                every = self._kept_at_every_point(name)
                state[name] = (self._at(name, self.context.active_coeffs()[k:k + 1])[0] if every is None
                               else self.context.of_active(every)[k])
            else:  # a copy of buffers: the module may update them in place (train-mode statistics)
                state[name] = origin.clone() if name in self.inner._buffers else origin
        return state

    def _at(self, name: str, coeffs: Tensor) -> Tensor:
        """(P, *shape) value of moving tensor `name` at the P points `coeffs` (P, J)."""
        flat_origin, flat_dirs = self._flat_parts(name)
        coeffs = coeffs if coeffs.dtype == flat_dirs.dtype else coeffs.to(flat_dirs.dtype)
        return torch.addmm(flat_origin, coeffs, flat_dirs).view(coeffs.shape[0], *self.origins[name].shape)

    def _kept_at_every_point(self, name: str) -> Optional[Tensor]:
        """(K, *shape) value of moving tensor `name` at every point where the context keeps
        it (`PointContext.kept_at_every_point`), else None."""
        flat_origin, flat_dirs = self._flat_parts(name)
        nbytes = self.context.coeffs.shape[0] * flat_dirs.shape[1] * flat_dirs.element_size()
        return self.context.kept_at_every_point((id(self), name), lambda c: self._at(name, c), nbytes,
                                                self.origins[name], flat_dirs)

    def _flat_parts(self, name: str) -> tuple[Tensor, Tensor]:
        """(1, N) origin and (J, N) directions of moving tensor `name`, views."""
        def make():
            d = self.directions[name]
            return self.origins[name].reshape(1, -1), d.reshape(d.shape[0], -1)
        return self._made_once(("flat", name), make)

    def _made_once(self, key, make):
        """make(), kept under `key` for later calls (not when made under a forward-mode
        transform: what it makes there dies with it)."""
        made = self._made.get(key)
        if made is None:
            made = make()
            if not self.context.forward_mode:
                self._made[key] = made
        return made

    def extra_repr(self) -> str:
        return f"path={self.path!r}, moving={sorted(self.directions)}"


def forward_is_inherited(module: nn.Module, base: type) -> bool:
    """True when `module` is a `base` whose forward is base's own (safe for base's rule),
    and so is a convolution's `_conv_forward`, the part of its forward that subclasses
    override (weight standardisation, a gain of their own)."""
    cls = type(module)
    return (isinstance(module, base) and cls.forward is base.forward
            and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None))
