"""nn.MultiheadAttention for K points: per-point projections, attention per example.

The in-projection weights are the module's own (in_proj_weight, or q/k/v_proj_weight);
the out-projection is its child `out_proj`, which the engine wraps like any Linear. The
attention itself has no parameters and runs on all K·B sequences at once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mlifast.multipoint.context import fold, unfold
from mlifast.multipoint.layers import linear_at_points
from mlifast.multipoint.rule import MultiPointRule
from mlifast.multipoint.shared import materialize_all


class MultiheadAttentionRule(MultiPointRule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.inner.bias_k is not None:
            raise NotImplementedError(
                f"mlifast: MultiheadAttention '{self.path}' has add_bias_kv=True, which mlifast "
                "does not interpolate yet; build it with add_bias_kv=False"
            )

    def _project(self, x: Tensor, weight: Tensor, dirs: Optional[Tensor], bias: Optional[Tensor],
                 bias_dirs: Optional[Tensor]) -> Tensor:
        """Per-point linear map of batch-first activations x (K·B, L, E)."""
        if dirs is None and bias_dirs is None:
            return F.linear(x, weight, bias)
        rows = fold(x, self.context.num_active)
        y = linear_at_points(self.context, rows.reshape(rows.shape[0], -1, x.shape[-1]), weight, bias, dirs,
                             bias_dirs)
        return unfold(y.reshape(*rows.shape[:-1], weight.shape[0]))

    def _in_projection(self, name: str, part: int, x: Tensor) -> Tensor:
        e = self.inner.embed_dim
        rows = slice(part * e, (part + 1) * e)
        if self.inner._qkv_same_embed_dim:
            weight, dirs = self.origin("in_proj_weight")[rows], self.directions.get("in_proj_weight")
            dirs = dirs[:, rows] if dirs is not None else None
        else:
            weight, dirs = self.origin(f"{name}_proj_weight"), self.directions.get(f"{name}_proj_weight")
        bias, bias_dirs = self.origin("in_proj_bias"), self.directions.get("in_proj_bias")
        if bias is not None:
            bias = bias[rows]
            bias_dirs = bias_dirs[:, rows] if bias_dirs is not None else None
        return self._project(x, weight, dirs, bias, bias_dirs)

    def _out_projection(self, x: Tensor) -> Tensor:
        out = self.inner.out_proj
        if isinstance(out, MultiPointRule):
            return self._project(x, out.origin("weight"), out.directions.get("weight"), out.origin("bias"),
                                 out.directions.get("bias"))
        return F.linear(x, out.weight, out.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        inner = self.inner
        query, key, value = materialize_all((query, key, value))
        if query.dim() != 3:
            raise ValueError(f"mlifast: MultiheadAttention '{self.path}' needs batched 3-D inputs, got {tuple(query.shape)}")
        if not inner.batch_first:  # work batch-first: (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt_len, _ = query.shape
        src_len, heads = key.shape[1], inner.num_heads
        q = self._in_projection("q", 0, query)
        k = self._in_projection("k", 1, key)
        v = self._in_projection("v", 2, value)
        split = lambda t, length: t.reshape(n, length, heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q, tgt_len), split(k, src_len), split(v, src_len)
        if not need_weights and not (inner.training and inner.dropout > 0):
            # (one fused kernel, as nn.MultiheadAttention takes without weights: on a
            # 64-token ViT 188 ms where the explicit product, softmax and mask took 300)
            masked = attn_mask is not None or key_padding_mask is not None
            mask = _additive_mask(attn_mask, key_padding_mask, is_causal, n, heads, tgt_len, src_len, q) \
                if masked else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and not masked)
            return self._finish(out, n, tgt_len), None
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (N, H, L, S)
        scores = scores + _additive_mask(attn_mask, key_padding_mask, is_causal, n, heads, tgt_len, src_len, scores)
        weights = torch.softmax(scores, dim=-1)
        if inner.training and inner.dropout > 0:
            weights = F.dropout(weights, p=inner.dropout)
        out = self._finish(weights @ v, n, tgt_len)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def _finish(self, heads_out: Tensor, n: int, tgt_len: int) -> Tensor:
        """The (N, H, L, head_dim) attention output through the out-projection, in the
        module's layout."""
        out = self._out_projection(heads_out.transpose(1, 2).reshape(n, tgt_len, self.inner.embed_dim))
        return out if self.inner.batch_first else out.transpose(0, 1)


def _additive_mask(attn_mask, key_padding_mask, is_causal, n, heads, tgt_len, src_len, like: Tensor):
    """Float mask broadcastable to (N, H, L, S): -inf where attention is not allowed
    (boolean masks follow nn.MultiheadAttention: True = masked)."""
    total = like.new_zeros(())
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=like.device).triu(1)
    if attn_mask is not None:
        m = _as_float(attn_mask, like)
        total = total + (_for_every_point(m, n * heads).reshape(n, heads, tgt_len, src_len) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        total = total + _for_every_point(_as_float(key_padding_mask, like), n).reshape(n, 1, 1, src_len)
    return total


def _for_every_point(mask: Tensor, rows: int) -> Tensor:
    """A mask with `rows` leading rows: one given once for every point's rows (an input whose
    batch is not at the model's batch_dim is not repeated for the points) repeated for each."""
    if mask.shape[0] != rows and rows % mask.shape[0] == 0:
        return mask.repeat(rows // mask.shape[0], *[1] * (mask.dim() - 1))
    return mask


def _as_float(mask: Tensor, like: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)
