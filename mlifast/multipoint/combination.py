"""A first layer's per-point output kept as its shared products (`PendingCombination`).

A layer affine in its parameters on rows every point shares (a CNN's stem convolution on
the input images) computes its output at the origin and along each direction once, the
J + 1 `SharedProducts`; each point's output is then their combination with its
coefficients, y_k = u_0 + Σ_j c_kj·u_j. Kept pending, a batch norm after it folds in as a
per-channel scale of each product and a shift, by batch statistics too (each point's
mean and variance follow from the products' own per-channel moments, `moments`, once a
second group of points combines the same products), and a ReLU after that joins: the whole of conv → batch norm → ReLU is one pass writing each
point's rows (`mlifast.ops.channel_combine`), where it took three (W2: the combination,
the batch norm's moments and its affine pass).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mlifast.multipoint.pending import RELU, RELU_IN_PLACE, PendingPostOps, _strides
from mlifast.ops import channel_combine
from mlifast.ops.channels import MAX_COMBINED

# Float64 values of each product a step of `SharedProducts.moments` holds (512 KiB: the
# steps stay in the L2 cache; 2 products of 64 channels-last images of 16 × 32 × 32:
# 6.5 ms a call, 11.5 in one step).
MOMENTS_CHUNK_VALUES = 1 << 16


class SharedProducts:
    """A layer's outputs (B, C, …) at the origin and along each of J directions, on rows
    every point shares, and their per-channel moments, computed once (the products are
    kept for every group of points of a call: `PointContext.reuse`)."""

    def __init__(self, products) -> None:
        self.products = tuple(products)
        self.uses = 0  # groups of points combined from them (PendingCombination.of)
        self._moments: Optional[tuple[Tensor, Tensor]] = None

    def moments(self) -> tuple[Tensor, Tensor]:
        """Float64 per-channel means (n, C) of the n = J + 1 products and their centred
        cross moments (n, n, C): mean over examples and positions of (u_i − m_i)(u_j − m_j)."""
        if self._moments is None:
            rows = [u.movedim(1, -1).reshape(-1, u.shape[1]) for u in self.products]  # (R, C): views if channels-last
            count, n = rows[0].shape[0], len(rows)
            mean = torch.stack([r.sum(0, dtype=torch.float64) for r in rows]) / count
            cross = mean.new_zeros(n, n, rows[0].shape[1])
            step = max(1, MOMENTS_CHUNK_VALUES // max(1, rows[0].shape[1]))
            for start in range(0, count, step):
                centred = [r[start:start + step].to(torch.float64) - m for r, m in zip(rows, mean)]
                for i in range(n):
                    for j in range(i, n):
                        cross[i, j] += (centred[i] * centred[j]).sum(0)
            for i in range(n):
                for j in range(i):
                    cross[i, j] = cross[j, i]
            self._moments = mean, cross / count
        return self._moments


class PendingCombination(PendingPostOps):
    """(K_active·B, C, …) rows Σ_j u_j·scales[k, j] + shift[k] per channel of point k, from
    `SharedProducts` u (B, C, …); scales (K_active, n, C), shift (K_active, C) in their
    dtype; relu: a ReLU after it (joined while nothing else is). Takes no addend: an
    addition computes it first."""

    @staticmethod
    def __new__(cls, shared: SharedProducts, scales: Tensor, shift: Tensor, relu: bool = False) -> "PendingCombination":
        first = shared.products[0]
        shape = (scales.shape[0] * first.shape[0], *first.shape[1:])
        layout = torch.contiguous_format if first.is_contiguous() else torch.channels_last
        t = Tensor._make_wrapper_subclass(cls, shape, strides=_strides(shape, layout), dtype=first.dtype,
                                          device=first.device)
        t._shared, t._scales, t._shift, t._relu = shared, scales, shift, relu
        t._init(shared.products, None, ())
        return t

    @staticmethod
    def of(shared: SharedProducts, coeffs: Tensor) -> "PendingCombination":
        """Each point's u_0 + Σ_j coeffs[k, j]·u_j, `coeffs` (K_active, J)."""
        shared.uses += 1
        first = shared.products[0]
        k, channels = coeffs.shape[0], first.shape[1]
        weights = torch.cat([coeffs.new_ones(k, 1), coeffs], 1).to(first.dtype)
        return PendingCombination(shared, weights.unsqueeze(2).expand(-1, -1, channels).contiguous(),
                                  first.new_zeros(k, channels))

    @staticmethod
    def applies(products: tuple) -> bool:
        """Whether products (B, C, …) can be combined so: at most MAX_COMBINED of them,
        float32/64 contiguous or channels-last images."""
        first = products[0]
        images = first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last)
        return (len(products) <= MAX_COMBINED and first.dim() >= 2 and first.dtype in (torch.float32, torch.float64)
                and (first.is_contiguous() or images) and all(u.stride() == first.stride() for u in products))

    @property
    def reused(self) -> bool:
        """Whether an earlier group of points of the call combined the same products (kept:
        `PointContext.reuse`), so that moments computed from them serve several groups."""
        return self._shared.uses > 1

    @property
    def foldable(self) -> bool:
        """Whether a per-channel affine map can fold in: not computed, no ReLU yet."""
        return self._value is None and not self._relu

    def normalized(self, scale: Tensor, shift: Tensor) -> "PendingCombination":
        """Each point's channels then scaled by (K_active, C) `scale` and shifted by `shift`."""
        assert self.foldable
        return PendingCombination(self._shared, self._scales * scale.unsqueeze(1).to(self._scales.dtype),
                                  torch.addcmul(shift.to(self._shift.dtype), self._shift, scale.to(self._shift.dtype)))

    def moments(self) -> tuple[Tensor, Tensor]:
        """Each point's per-channel mean and biased variance (K_active, C), float64, from
        the products' moments: the variance of Σ_j a_j·u_j is Σ_ij a_i·a_j·cov(u_i, u_j)."""
        mean, cross = self._shared.moments()
        a = self._scales.to(torch.float64)
        var = torch.einsum("kic,ijc,kjc->kc", a, cross, a).clamp_min_(0)
        return torch.einsum("kic,ic->kc", a, mean) + self._shift.to(torch.float64), var

    def point_rows(self, points: int) -> Tensor:
        return self._inputs[0]  # (B, C, …): a point's rows, in the output's layout

    def _joined(self, func, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """A ReLU joins (in place too); nothing else does."""
        if self.computed or self._relu or func not in RELU or len(args) != 1 or not set(kwargs) <= {"inplace"}:
            return None
        if func in RELU_IN_PLACE or kwargs.get("inplace", False):
            self._relu = True
            return self
        return PendingCombination(self._shared, self._scales, self._shift, relu=True)

    def _computed_with(self, relu: bool) -> Tensor:
        return channel_combine(list(self._inputs), self._scales, self._shift, relu or self._relu)

    def _release(self) -> None:
        super()._release()
        self._shared = self._scales = self._shift = None
