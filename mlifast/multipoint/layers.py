"""Fused rules for the standard layers (see ARCHITECTURE.md to add one).

- Linear: the fused `mlifast::multipoint_linear` op (never K weight copies).
- Layers affine in their parameters (convolutions, transposed convolutions, embeddings,
  Hugging Face Conv1D): by linearity f(x; θ0 + Σ c_j d_j) = f(x; θ0) + Σ c_j f(x; d_j),
  J + 1 calls of the layer itself on all rows, then a per-point combine. Convolutions on
  the CPU with enough rows a point instead run each point's rows with that point's
  weights (`one_point_per_call`, `ConvRule.PER_POINT_MIN_POSITIONS`).
- Norms (LayerNorm, RMSNorm, GroupNorm): normalise without affine, then each point's
  (K, C) scale and shift.
- Batch norm: each point's statistics — interpolated running statistics, its own batch
  statistics, or statistics recomputed over a data set (the "recompute" policy).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules import module as module_globals

from mlifast.multipoint.combination import PendingCombination, SharedProducts
from mlifast.multipoint.context import fold, rows_for_every_example, unfold
from mlifast.multipoint.pending import (Pending, PendingAffine, PendingConvolution, _channels_last, _output_shape,
                                       winograd_takes)
from mlifast.multipoint.relu_line import PendingLine
from mlifast.multipoint.rule import MultiPointRule
from mlifast.multipoint.shared import SharedRows
from mlifast.ops import channel_moments, multipoint_combine
from mlifast.ops._checks import carries_derivatives
from mlifast.ops.channels import in_kernel_layout


# Devices whose batch norms run as channel_moments and channel_affine (BatchNormRule):
# the CPU (W2's statistics pass 1.95 → 1.83 s, BENCHMARKS.md). On CUDA the kernels are
# right but W2 was 0.79× as fast with them as with cuDNN's (an H200, gpu_candidates.py).
CHANNEL_PASSES_DEVICES = {"cpu"}


# torch's hooks on every module (register_module_forward_hook, …), which a layer's products
# run only when called as modules.
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def one_point_per_call(x: Tensor) -> bool:
    """Whether a rule calls ATen's kernel once per active point, each time with that
    point's own parameters, rather than once over the rows of all points in a wide form.

    On the CPU, yes: the points of a call are a cache-sized group (often one point), and
    oneDNN's convolution (from enough rows a point) and ATen's batch norm on one point's
    rows beat the wide forms, which compute J + 1 convolutions (FLOPs ×(J + 1)), and for
    batch norm a reduction over a strided view and a broadcast multiply-add (2–3× slower
    than ATen's kernel on NCHW rows; W2 in BENCHMARKS.md).
    On a GPU one launch over all points keeps the device busy.
    """
    return x.is_cpu


def channel_passes_apply(context, x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a norm's rule normalises x by `channel_moments` and `channel_affine`: float32/64
    rows of every point (not shared ones) on a device of CHANNEL_PASSES_DEVICES, outside
    forward mode and autograd (the ops have neither)."""
    return type(x) is Tensor and x.device.type in CHANNEL_PASSES_DEVICES and x.dtype in (
        torch.float32, torch.float64) and not (context.forward_mode or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, *tensors))))


def linear_at_points(context, x: Tensor, w: Tensor, b: Tensor | None, w_dirs: Tensor | None,
                     b_dirs: Tensor | None, relu: bool = False) -> Tensor:
    """(K, R, O) outputs of a linear layer at the K active points (through a ReLU if `relu`).

    x: (K, R, I) rows of each point, or (R, I) rows shared by every point; w (O, I) and
    b (O,) at the origin; w_dirs (J, O, I), b_dirs (J, O) or None where fixed.
    """
    k, c = context.num_active, context.active_coeffs().to(w.dtype)
    if w_dirs is None:  # only the bias moves: one plain GEMM, then each point's bias
        y = context.reuse(lambda: F.linear(x, w), x, w) if x.dim() == 2 else F.linear(x, w)
        bias = b if b_dirs is None else b + c @ b_dirs  # (O,) or (K, O)
        y = y + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
        y = y.relu_() if relu else y
        return y.expand(k, *y.shape[-2:]) if y.dim() == 2 else y
    b_dirs = b_dirs if b is not None else None
    if x.dim() == 2 and context.grouped and not context.forward_mode:
        # Rows shared by every point, whose points run in groups: x·Wᵀ and x·Dᵀ once per
        # call of the model, then each group's combine (what the op does in one go).
        base, along = shared_products(context, x, w, w_dirs)
        return multipoint_combine(base, along.unflatten(1, w_dirs.shape[:2]), b, b_dirs, c, relu)
    return context.linear(x, w, b, w_dirs, b_dirs, c, relu)


def shared_products(context, x: Tensor, w: Tensor, w_dirs: Tensor) -> tuple[Tensor, Tensor]:
    """x·Wᵀ (R, O) and x·Dᵀ (R, J·O) of rows x (R, I) shared by every point, computed once
    per call of the model (PointContext.reuse)."""
    return context.reuse(lambda: (F.linear(x, w), F.linear(x, w_dirs.flatten(0, 1))), x, w, w_dirs)


class LinearRule(MultiPointRule):
    """`multipoint_linear`. On rows shared by every point, the output is a `PendingLine`
    where it applies (the products kept; a following ReLU and linear rule compute from them
    with relu_line_linear, multipoint/relu_line.py)."""

    fresh_output = True
    relu = False  # True: a ReLU right after it joins the op (model.fuse_activations)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.line_outputs: list[Tensor] = []  # relu_line_linear's output memory, kept (relu_line._output_memory)

    def weight_and_directions(self) -> tuple[Tensor, Tensor | None]:
        """The (O, I) weight at the origin and its (J, O, I) directions (None if fixed)."""
        return self.origin("weight"), self.directions.get("weight")

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, PendingLine):
            y = x.linear_after(self)
            if y is not None:
                return y
            x = x.materialize()
        (w, w_dirs), b = self.weight_and_directions(), self.origin("bias")
        k = self.context.num_active
        shared = isinstance(x, SharedRows)
        dim = 0 if shared else self.context.rows_dim(x)
        if shared and PendingLine.applies(self, x):
            rows = x.rows()
            products = shared_products(self.context, rows.reshape(-1, rows.shape[-1]), w, w_dirs)
            return PendingLine(self, tuple(rows.shape), products, 0.0 if self.relu else None)
        if shared or dim is None:  # the same rows for every point: computed once
            rows = x.rows() if shared else x
            y = linear_at_points(self.context, rows.reshape(-1, rows.shape[-1]), w, b, w_dirs,
                                 self.directions.get("bias"), self.relu)
            y = y.reshape(k, *rows.shape[:-1], w.shape[0])
            return y.flatten(0, 1) if shared else rows_for_every_example(y, self.context.batch_size)
        rows = fold(x, k, dim)
        y = linear_at_points(self.context, rows.reshape(k, -1, rows.shape[-1]), w, b, w_dirs,
                             self.directions.get("bias"), self.relu)
        return unfold(y.reshape(*rows.shape[:-1], w.shape[0]), dim)


class HFConv1DRule(LinearRule):
    """Hugging Face's Conv1D (GPT-2): a linear layer whose weight is stored (I, O)."""

    def weight_and_directions(self):
        d = self.directions.get("weight")
        return self.origin("weight").t(), d.transpose(1, 2) if d is not None else None


class AffineInParamsRule(MultiPointRule):
    """For layers whose output is affine in their parameters jointly (y = g(x, W) + b)."""

    fresh_output = True

    def batch_dim(self, x: Tensor) -> int | None:
        return 0  # convolutions: (N, C, …)

    def _zeros(self) -> dict[str, Tensor]:
        """Zeros of each own tensor's shape (the layer along a direction has none of the
        origin's), made once: a launch each per call on a GPU."""
        return self._made_once("zeros", lambda: {name: torch.zeros_like(t) for name, t in self.origins.items()})

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        k, c = self.context.num_active, self.context.active_coeffs()
        rows_shared = isinstance(x, SharedRows)
        if rows_shared:
            x = x.rows()
        dim = 0 if rows_shared else self.batch_dim(x)
        # The same input for every point: shared rows, or no batch at all (position ids).
        shared = rows_shared or dim is None
        call = (x, *args)
        # The layer at the origin, then along each direction (bias and all: zeros).
        states = [dict(self.origins)] + [
            {**self._zeros(), **{name: d[j] for name, d in self.directions.items()}} for j in range(c.shape[1])]
        products = (self.product(state, call, kwargs) for state in states)
        if shared and not args and not kwargs:  # the same for every group of points of this call
            products = self.context.reuse(lambda: SharedProducts(products), x, *self.origins.values(),
                                          *self.directions.values(), owner=self)
            if rows_shared and self._combination_applies(products):
                return PendingCombination.of(products, c)
            products = products.products
        products = iter(products)
        base = next(products)
        out = base.unsqueeze(0).expand(k, *base.shape) if shared else fold(base, k, dim)
        for j, y_j in enumerate(products):
            y_j = y_j.unsqueeze(0) if shared else fold(y_j, k, dim)
            out = torch.addcmul(out, c[:, j].to(y_j.dtype).reshape(k, *([1] * (y_j.dim() - 1))), y_j)
        if rows_shared:
            return out.flatten(0, 1)
        return rows_for_every_example(out, self.context.batch_size) if shared else unfold(out, dim)

    def product(self, state: dict[str, Tensor], call: tuple, kwargs: dict) -> Tensor:
        """The layer's output with `state` for its own tensors."""
        return functional_call(self.inner, state, call, kwargs)

    def _called_plainly(self, call: tuple, kwargs: dict, *classes: type) -> bool:
        """Whether `product` may run the layer's forward as a function of its tensors: its
        forward that of one of torch's `classes` (not a user's class given this rule), one
        input, and no hook on it or on every module (the probe of activation sizes counts
        the products by hooks; a user's hooks run as before)."""
        m = self.inner
        return (len(call) == 1 and not kwargs and any(type(m).forward is cls.forward for cls in classes)
                and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                         or any(getattr(module_globals, name, None) for name in _GLOBAL_HOOKS)))

    def _combination_applies(self, shared: SharedProducts) -> bool:
        """Whether the output stays a PendingCombination of the products (see
        multipoint/combination.py): on a device of CHANNEL_PASSES_DEVICES, where results
        of the products and the coordinates may stay pending (not while the coordinates
        carry derivatives: channel_combine has none)."""
        first = shared.products[0]
        return (first.device.type in CHANNEL_PASSES_DEVICES and PendingCombination.applies(shared.products)
                and self.context.may_defer(*shared.products, self.context.coeffs))


class ConvRule(AffineInParamsRule):
    """Conv1d/2d/3d: where `one_point_per_call` and each point has at least
    PER_POINT_MIN_POSITIONS input positions (images × spatial size), each point's rows go
    through the layer with that point's weight and bias, formed per call (the model's own
    FLOPs, not J + 1 times them), in the activations' layout (channels-last where the
    first-call check found the model agrees: MultiPointModel.images_channels_last).
    Smaller calls, and rows shared by every point (a first layer: once for all points of a
    call), take the J + 1 products."""

    # benchmarks/conv_crossover.py (2 cores, float32 NCHW, 3×3, 16–64 channels, 4–16
    # points, each operation on its own): from 4,096 positions a point the per-point form is
    # 1.9–3.5× faster, at 1,024 0.4–1.6×, at ≤ 256 mostly slower (0.2–2.4×).
    PER_POINT_MIN_POSITIONS = 2048
    # ... and from a quarter of that where each point's convolution is large, C_in·C_out of
    # PER_POINT_LARGE_CHANNEL_PAIRS or more, or Winograd computes it. In models (channels-
    # last, the batch norm, addition and ReLU joined): W2 (ResNet-20) at batch 16 3.22–3.44 →
    # 2.62–2.68 s (stage 3: 1,024 positions, 64 channels, Winograd), at batch 8 3.71 → 3.64 s
    # (512 positions, 64 channels), at batch 4 4.68 → 4.35–4.48 s (stage 2: 1,024 positions,
    # Winograd); the review's convolutions at 512 positions: 64 channels 0.77–0.93× the
    # stacked form's time, 16–32 channels without Winograd 1.15–2.2× (so not those).
    PER_POINT_LARGE_CHANNEL_PAIRS = 64 * 64

    def _per_point(self, x: Tensor) -> bool:
        """Whether each point's rows go through the layer on their own (see above)."""
        positions = x.numel() // (self.context.num_active * x.shape[1])
        if positions >= self.PER_POINT_MIN_POSITIONS:
            return True
        if positions < self.PER_POINT_MIN_POSITIONS // 4:
            return False
        conv = self.inner
        return (conv.in_channels // conv.groups * conv.out_channels >= self.PER_POINT_LARGE_CHANNEL_PAIRS
                or winograd_takes(conv, x, self.context.num_active))

    # Where a point has too few positions to go through the layer on its own, a 2-d
    # convolution of this many input × output channels or more is a linear layer of each
    # point's unfolded patches (`multipoint_linear`: one product a point, the weight formed
    # in registers), not the J + 1 convolutions over every point's rows. ResNet-18's 3 × 3
    # convolutions at 2 × 2 and 4 × 4 (64 px inputs, batch 16: 64 and 256 positions a
    # point): K = 8, 512 channels, 64 rows a point 13.8 against 47 ms (a survey, BENCHMARKS.md).
    UNFOLDED_MIN_CHANNEL_PAIRS = 128 * 128

    def _unfolded(self, x: Tensor) -> bool:
        """Whether the layer runs as a linear layer of each point's patches (see above)."""
        conv = self.inner
        return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str) and x.dim() == 4 and not x.is_complex()
                and conv.in_channels * conv.out_channels >= self.UNFOLDED_MIN_CHANNEL_PAIRS)

    def _by_unfolded_patches(self, x: Tensor) -> Tensor:
        """(K·B, C_out, H', W') by multipoint_linear on each point's (B·H'·W', C_in·kh·kw)
        patches, in the layout the convolution gives (channels-last for channels-last x: as
        the product gives it; else contiguous, which a model's `.view` may rely on)."""
        conv, k = self.inner, self.context.num_active
        patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (K·B, C_in·kh·kw, L)
        n, features, positions = patches.shape
        rows = patches.transpose(1, 2).reshape(k, n // k * positions, features)
        weight, weight_dirs = self.origin("weight"), self.directions.get("weight")
        y = linear_at_points(self.context, rows, weight.reshape(weight.shape[0], -1), self.origin("bias"),
                             None if weight_dirs is None else weight_dirs.flatten(2), self.directions.get("bias"))
        _, c_out, h, w = _output_shape(conv, tuple(x.shape))
        out = y.reshape(n, h, w, c_out).permute(0, 3, 1, 2)
        return out if _channels_last(x) else out.contiguous()

    def product(self, state: dict[str, Tensor], call: tuple, kwargs: dict) -> Tensor:
        """The convolution's own forward with `state`'s weight and bias, without
        functional_call's swapping of the module's tensors (on a GPU twice the time of
        cuDNN's launch: W2's 19 convolutions, twice a pass, three passes a call). Its
        `_conv_forward` may be a subclass's given this rule (a fixed mask of its own)."""
        if not self._called_plainly(call, kwargs, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return super().product(state, call, kwargs)
        return self.inner._conv_forward(call[0], state["weight"], state.get("bias"))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if isinstance(x, SharedRows) or args or kwargs or not one_point_per_call(x):
            return super().forward(x, *args, **kwargs)
        if not self._per_point(x):
            if self._unfolded(x):
                return self._by_unfolded_patches(x.materialize() if isinstance(x, Pending) else x)
            return super().forward(x, *args, **kwargs)
        weight, bias = self.per_point("weight"), self.per_point("bias")
        pending = PendingConvolution.of(self.inner, x, weight, bias)
        # (a batch norm, a residual addition and a ReLU after it join it)
        return pending if self.context.may_defer(*pending.inputs, weight, bias) else pending.result()


class EmbeddingRule(AffineInParamsRule):
    """Gathers rows of the origin and of each direction, then combines (row-wise layer)."""

    def product(self, state: dict[str, Tensor], call: tuple, kwargs: dict) -> Tensor:
        """nn.Embedding's forward with `state`'s weight (max_norm is refused: check_supported)."""
        if not self._called_plainly(call, kwargs, nn.Embedding):
            return super().product(state, call, kwargs)
        e = self.inner
        return F.embedding(call[0], state["weight"], e.padding_idx, e.max_norm, e.norm_type,
                           e.scale_grad_by_freq, e.sparse)

    def batch_dim(self, x: Tensor) -> int | None:
        dim = self.context.rows_dim(x, feature_dims=0)
        if x.dim() == 1 and dim is not None:
            self.context.flat_indices_fit_rows = True
            if self.context.flat_indices_shared:
                return None
        return dim


def _channel_view(v: Tensor, ndim: int, channel_dim: int) -> Tensor:
    """(K, C) → (K, 1, …, C, 1, …) broadcastable against (K, B, …) with C at channel_dim+1."""
    shape = [v.shape[0]] + [1] * (ndim - 1)
    shape[channel_dim + 1] = v.shape[1]
    return v.reshape(shape)


class _AffineNormRule(MultiPointRule):
    """Normalise without affine (`normalize`), then apply each point's weight and bias."""

    channel_dim: int  # where C sits in the per-point activations (B, …)
    fresh_output = True

    def normalize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def scale_and_shift(self, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """y: (K, B, …); weight, bias: (K, *param_shape) or None."""
        if weight is not None and bias is not None:  # one pass
            return torch.addcmul(self.broadcastable(bias, y), y, self.broadcastable(weight, y))
        if weight is not None:
            y = y * self.broadcastable(weight, y)
        if bias is not None:
            y = y + self.broadcastable(bias, y)
        return y

    def broadcastable(self, v: Tensor, y: Tensor) -> Tensor:
        if self.channel_dim < 0:  # trailing normalized_shape
            return v.reshape(v.shape[0], *([1] * (y.dim() - v.dim())), *v.shape[1:])
        return _channel_view(v, y.dim(), self.channel_dim)

    def forward(self, x: Tensor) -> Tensor:
        k = self.context.num_active
        if isinstance(x, SharedRows):
            x = x.materialize()
        dim = self.context.rows_dim(x, len(self.inner.normalized_shape)) if self.channel_dim < 0 else 0
        if dim is None:  # the same input for every example
            y = self.normalize(x).unsqueeze(0).expand(k, *x.shape)
            y = self.scale_and_shift(y, self.per_point("weight"), self.per_point("bias"))
            return rows_for_every_example(y, self.context.batch_size)
        y = fold(self.normalize(x), k, dim)
        return unfold(self.scale_and_shift(y, self.per_point("weight"), self.per_point("bias")), dim)


class LayerNormRule(_AffineNormRule):
    channel_dim = -1

    def normalize(self, x):
        return F.layer_norm(x, self.inner.normalized_shape, None, None, self.inner.eps)


class RMSNormRule(_AffineNormRule):
    channel_dim = -1

    def normalize(self, x):
        return F.rms_norm(x, self.inner.normalized_shape, None, self.inner.eps)


class GroupNormRule(_AffineNormRule):
    """On a device of CHANNEL_PASSES_DEVICES, two passes over the rows: each example's group
    statistics (`channel_moments`), then its (K·B, C) scale and shift (`channel_affine`,
    pending: an addition or ReLU after it joins that pass). ATen's group norm without
    affine and a broadcast multiply-add took three (GN CNN, 256 × 32 × 32² floats:
    8.7 against 2.8 ms)."""

    channel_dim = 1

    def normalize(self, x):
        return F.group_norm(x, self.inner.num_groups, None, None, self.inner.eps)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.per_point("weight"), self.per_point("bias")
        if isinstance(x, Pending):
            x = x.materialize()
        if (weight is None or bias is None or x.dim() < 3 or x.numel() == 0
                or not channel_passes_apply(self.context, x, weight, bias)):
            return super().forward(x)
        y = self._pending_affine(in_kernel_layout(x), weight, bias)
        return y if self.context.may_defer(x) else y.result()

    def _pending_affine(self, x: Tensor, weight: Tensor, bias: Tensor) -> PendingAffine:
        """x (K·B, C, …) normalised per example and group, times each point's (K, C) weight
        plus its bias, pending. Statistics in float64: a contiguous group is one run of
        values; in channels-last images, per-channel moments merged per group."""
        n, channels, groups = x.shape[0], x.shape[1], self.inner.num_groups
        if x.is_contiguous():
            mean, var = (m.to(torch.float64).view(n, groups, 1) for m in channel_moments(x.view(n * groups, 1, -1),
                                                                                          n * groups))
        else:
            mean_c, var_c = (m.to(torch.float64).view(n, groups, -1) for m in channel_moments(x, n))
            mean = mean_c.mean(-1, keepdim=True)
            var = var_c.mean(-1, keepdim=True) + mean_c.var(-1, correction=0, keepdim=True)
        per_channel = (n, groups, channels // groups)
        examples = n // self.context.num_active
        scale = torch.rsqrt(var + self.inner.eps).expand(per_channel).reshape(n, channels) * \
            weight.to(torch.float64).repeat_interleave(examples, 0)
        shift = torch.addcmul(bias.to(torch.float64).repeat_interleave(examples, 0),
                              mean.expand(per_channel).reshape(n, channels), scale, value=-1)
        return PendingAffine(x, scale.to(x.dtype), shift.to(x.dtype))


class BatchNormRule(_AffineNormRule):
    """Per-point batch norm. Which statistics normalise each point's rows:

    - context.bn_mode "running" (eval mode): the point's running statistics —
      recomputed ones if a "collect" pass produced them, else the interpolated buffers;
    - "batch", or the module in train mode, or without running statistics: the point's
      own batch statistics (running statistics untouched);
    - "collect": batch statistics, also averaged over batches with equal weight per batch
      into recomputed running statistics — exactly what
      torch.optim.swa_utils.update_bn computes (momentum=None) for each point.
    """

    channel_dim = 1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recomputed: tuple[Tensor, Tensor] | None = None
        self._sums: tuple[Tensor, Tensor] | None = None  # (2, K, C) means and variances, (K,) batches

    def start_collecting(self) -> None:
        k, c = self.context.coeffs.shape[0], self.inner.num_features
        device = self.context.coeffs.device
        self._sums = (torch.zeros(2, k, c, dtype=torch.float64, device=device),
                      torch.zeros(k, dtype=torch.float64, device=device))
        self.recomputed = None

    def gathered(self) -> tuple | None:
        """A copy of the sums "collect" gathered so far (None when not collecting)."""
        return None if self._sums is None else tuple(t.clone() for t in self._sums)

    def set_gathered(self, sums: tuple | None) -> None:
        """Put back sums from `gathered` (undoing a run that is run again)."""
        self._sums = sums

    def finish_collecting(self) -> None:
        (mean_sum, var_sum), batches = self._sums
        dtype = self.origins["running_mean"].dtype if "running_mean" in self.origins else mean_sum.dtype
        if (batches == 0).any():
            raise RuntimeError(f"mlifast: batch norm '{self.path}' saw no batch while recomputing statistics")
        n = batches.unsqueeze(1)
        self.recomputed = ((mean_sum / n).to(dtype), (var_sum / n).to(dtype))
        self._sums = None

    def forward(self, x: Tensor) -> Tensor:
        inner, mode = self.inner, self.context.bn_mode
        k = self.context.num_active
        use_batch = mode in ("batch", "collect") or inner.training or self.origin("running_mean") is None
        moments = None  # each point's (mean, biased variance), where computing x gathered them
        if isinstance(x, Pending):  # e.g. a convolution's output, perhaps not computed yet
            if not use_batch and isinstance(x, PendingConvolution) and x.foldable:
                return self._folded_into(x)
            computed = x.computed_with_moments() if use_batch and isinstance(x, PendingConvolution) else None
            if computed is not None:
                x, moments = computed[0], computed[1:]
            elif not (isinstance(x, PendingCombination) and x.foldable and (not use_batch or x.reused)):
                x = x.materialize()  # (batch statistics from a combination's products: once they serve several groups)
        examples = x.shape[0] if isinstance(x, SharedRows) else x.shape[0] // k  # (a point's)
        if use_batch and examples * math.prod(x.shape[2:]) <= 1:
            raise ValueError(
                f"mlifast: batch norm '{self.path}' needs more than one value per channel "
                f"for batch statistics, got input of shape {tuple(x.shape[1:])} with "
                f"{examples} example(s) per point"
            )
        if not use_batch:
            stats = self._running_statistics()
        elif mode == "collect":  # filled with each point's mean and variance
            stats = torch.zeros(2, k, x.shape[1], dtype=x.dtype, device=x.device)
        else:
            stats = None
        weight, bias = self.per_point("weight"), self.per_point("bias")
        if isinstance(x, PendingCombination):
            y = self._folded_into_combination(x, stats, weight, bias, use_batch)
        elif channel_passes_apply(self.context, x, weight, bias, *(stats if isinstance(stats, tuple) else ())):
            y = self._pending_affine(x, stats, weight, bias, use_batch, moments)
            y = y if self.context.may_defer(x) else y.result()
        # (ATen's batch norm has no derivative for running statistics, forward or backward)
        elif one_point_per_call(x) and (use_batch or not (self.context.forward_mode or carries_derivatives(*stats))):
            y = self._normalize_each_point(self.split_points(x, 0), stats, weight, bias, use_batch)
        else:
            y = unfold(self._normalize_all_points(self.split_points(x, 0), stats, weight, bias, use_batch))
        if mode == "collect":
            sums, batches = self._sums
            start, stop = self.context.active_span
            sums[:, start:stop] += stats
            batches[start:stop] += 1
        return y

    def _pending_affine(self, x: Tensor, stats, weight, bias, use_batch: bool,
                        moments: tuple[Tensor, Tensor] | None = None) -> PendingAffine:
        """(K·B, C, …) rows x normalised, pending: with `use_batch` by each point's batch
        statistics (`moments` where computing x gathered them, else `channel_moments`),
        which `stats`, if given, receive as mean and unbiased variance; else by the running
        statistics `stats`. A residual addition and a ReLU after it join the pass that
        applies them (`channel_affine`)."""
        k, x = self.context.num_active, in_kernel_layout(x)  # (made contiguous once for both passes)
        if use_batch:
            mean, var = (m.to(x.dtype) for m in moments) if moments is not None else channel_moments(x, k)
            if stats is not None:
                _record_statistics(stats, mean, var, x.numel() // (k * x.shape[1]))
        else:
            mean, var = stats
        scale, shift = self._scale_and_shift(mean, var, weight, bias)
        return PendingAffine(x, scale.to(x.dtype), shift.to(x.dtype))

    def _folded_into_combination(self, x: PendingCombination, stats, weight, bias,
                                 use_batch: bool) -> PendingCombination:
        """x's rows normalised as `_pending_affine` does, folded into the combination
        (each point's batch statistics from the products' moments), still pending."""
        if use_batch:
            mean, var = (m.to(x.dtype) for m in x.moments())
            if stats is not None:
                _record_statistics(stats, mean, var, x.numel() // x.shape[1] // self.context.num_active)
        else:
            mean, var = stats
        y = x.normalized(*self._scale_and_shift(mean, var, weight, bias))
        return y if self.context.may_defer(*y.inputs) else y.result()

    def _scale_and_shift(self, mean: Tensor, var: Tensor, weight, bias) -> tuple[Tensor, Tensor]:
        """(K, C) scale and shift of each point's normalisation by `mean` and `var`, with
        its `weight` and `bias` (or None): y = x·scale + shift."""
        scale = torch.rsqrt(var + self.inner.eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        return scale, shift

    def _running_statistics(self) -> tuple[Tensor, Tensor]:
        """(K_active, C) means and variances: recomputed ones if a "collect" pass produced
        them, else the interpolated running statistics."""
        if self.recomputed is not None:
            return tuple(self.context.of_active(s) for s in self.recomputed)
        return self.per_point("running_mean"), self.per_point("running_var")

    def _folded_into(self, conv: PendingConvolution) -> PendingConvolution:
        """Normalisation by running statistics, an affine map per channel, folded into the
        convolution that produced `conv`: each point's weight scaled, its bias shifted."""
        scale, shift = self._scale_and_shift(*self._running_statistics(), self.per_point("weight"),
                                             self.per_point("bias"))
        return conv.folded(scale, shift)

    def _normalize_each_point(self, xk: Tensor, stats, weight, bias, use_batch: bool) -> Tensor:
        """(K·B, C, …) from ATen's batch norm on each point's (B, C, …) rows: with
        `use_batch`, batch statistics, which `stats`, if given, receive (each point's batch
        mean and unbiased variance: momentum 1 makes the running statistics exactly
        those); else the running statistics `stats`."""
        outs = []
        for i, rows in enumerate(xk):
            mean, var = (None, None) if stats is None else (stats[0][i], stats[1][i])
            outs.append(F.batch_norm(rows, mean, var, None if weight is None else weight[i],
                                     None if bias is None else bias[i], use_batch, 1.0, self.inner.eps))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _normalize_all_points(self, xk: Tensor, stats, weight, bias, use_batch: bool) -> Tensor:
        """(K, B, C, …) in two passes over the rows of all points: the statistics, then
        one multiply-add with each point's folded scale and shift. With `use_batch` and
        `stats` given, stats receive each point's batch mean and unbiased variance."""
        if use_batch:
            var, mean = torch.var_mean(xk, dim=[1] + list(range(3, xk.dim())), correction=0)
            if stats is not None:
                _record_statistics(stats, mean, var, xk.numel() // (xk.shape[0] * xk.shape[2]))
        else:
            mean, var = stats
        scale, shift = self._scale_and_shift(mean, var, weight, bias)
        return torch.addcmul(_channel_view(shift, xk.dim(), 1), xk, _channel_view(scale, xk.dim(), 1))


def _record_statistics(stats: Tensor, mean: Tensor, var: Tensor, count: int) -> None:
    """Into stats (2, K, C): each point's batch mean and unbiased variance from `count`
    values a channel (momentum 1 makes the running statistics exactly those)."""
    stats[0].copy_(mean)
    stats[1].copy_(var * (count / (count - 1)))


class InPlaceActivation(nn.Module):
    """Stands for an activation module (`inner`) that directly follows a rule with a fresh
    output in an nn.Sequential: applies it in place, saving an allocation and a pass over
    the K·B rows (see model.fuse_activations)."""

    # module type -> its in-place form, fn(module, x)
    IN_PLACE = {
        nn.ReLU: lambda m, x: torch.relu_(x),
        nn.Tanh: lambda m, x: torch.tanh_(x),
        nn.Sigmoid: lambda m, x: torch.sigmoid_(x),
        nn.SiLU: lambda m, x: F.silu(x, inplace=True),
        nn.Hardswish: lambda m, x: F.hardswish(x, inplace=True),
        nn.ReLU6: lambda m, x: F.relu6(x, inplace=True),
        nn.Hardtanh: lambda m, x: F.hardtanh(x, m.min_val, m.max_val, inplace=True),
        # (in place, a negative slope or alpha has no backward in PyTorch: those stay out of place)
        nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope, inplace=m.negative_slope >= 0),
        nn.ELU: lambda m, x: F.elu(x, m.alpha, inplace=m.alpha >= 0),
    }

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.fn = self.IN_PLACE[type(inner)]

    def forward(self, x: Tensor) -> Tensor:
        if type(x) is not Tensor and not isinstance(x, Pending):  # e.g. shared rows: as it is
            return self.inner(x)
        return self.fn(self.inner, x)  # (a pending result computes itself first, or joins a ReLU or post-op)
