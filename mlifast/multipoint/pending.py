"""Results not computed until something reads them (`Pending`); here the per-point
channel results whose post-ops join them (`PendingPostOps`): a convolution's output
(`PendingConvolution`) and a batch norm's (`PendingAffine`). `relu_line.PendingLine` and
`combination.PendingCombination` (a first layer's products on shared rows) are the others.

What the layers after a convolution or a batch norm do to its output can often join it,
saving a pass over the activations each:
- batch norm with running statistics, an affine map per channel, folds into each point's
  convolution weight and bias (`BatchNormRule`; W2's evaluation pass: 919 of its 1,050
  batch norms);
- a residual addition of a same-shaped tensor, `conv(x) + shortcut` or `out += identity`,
  and a ReLU after it run in the output step of `mlifast.ops.winograd_conv3x3` (3 × 3
  stride-1 convolutions of float32 on the CPU, `_winograd_applies`), or inside oneDNN's
  convolution as post-ops (other float32 convolutions on the CPU: the same numbers as the
  separate operations), or in the pass that applies a batch norm's statistics
  (`mlifast.ops.channel_affine`). ResNets end every block with relu(bn(conv(·)) + shortcut);
- a batch norm by batch statistics and the ReLU after it, before a convolution that
  `winograd_conv3x3` computes, run in that convolution's input step (`PendingAffine` kept
  pending through the ReLU, `PendingConvolution.of`): relu(bn1(conv1(x))) → conv2 in a
  ResNet block's statistics pass.
A pending result carries what it needs; any other operation computes it first
(`materialize`) and then runs itself.

Its inputs and addend are read when it computes: should the model write into either
before (a model writing into an activation a convolution has read), it raises
`PendingInputWritten`, and MultiPointModel runs the call again with every result computed
at once (`PointContext.defer_pending`).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from mlifast._extension import compiled
from mlifast.multipoint.context import fold
from mlifast.multipoint.shared import materialize
from mlifast.ops import channel_affine
from mlifast.ops._checks import carries_derivatives
from mlifast.ops.winograd import CHANNEL_MULTIPLE as WINOGRAD_CHANNEL_MULTIPLE


class PendingInputWritten(Exception):
    """The model wrote into a pending result's input or addend before it was computed."""


class Pending(Tensor):
    """A result (a wrapper tensor of its shape, dtype and device) not computed until
    something reads it. Subclasses compute it in `materialize()` and say in `_join` which
    operations on it join the computation instead (None: it is read)."""

    def materialize(self) -> Tensor:
        raise NotImplementedError

    @classmethod
    def _join(cls, func, args: tuple, kwargs: dict) -> Optional[Tensor]:
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Shape, dtype and device from the wrapper; what joins it (`_join`); everything
        else — operations, and what reads memory without an operator (`data_ptr`, `numpy`)
        — on the result."""
        kwargs = kwargs or {}
        if func in _METADATA or getattr(getattr(func, "__self__", None), "__name__", None) in _PROPERTIES:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        for kind in dict.fromkeys(t for t in types if issubclass(t, Pending)):  # (each kind in the args)
            joined = kind._join(func, args, kwargs)
            if joined is not None:
                return joined
        return func(*tree_map(_computed, args), **tree_map(_computed, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # (operators reached from C++)
        return func(*tree_map(_computed, args), **tree_map(_computed, kwargs or {}))


class PendingPostOps(Pending):
    """A (K_active·B, C, …) result plus an optional addend of the same shape, then an
    optional ReLU: an addition of a plain tensor and a ReLU after it join (`_joined`).

    Subclasses hold what the result needs and compute it in `_computed_with(relu)`; `inputs`
    are the tensors it reads, whose versions (with the addend's) must not change before.
    Only for tensors outside autograd (its result is computed below autograd's dispatch).
    """

    _addend: Optional[Tensor]
    _versions: tuple
    _value: Optional[Tensor]
    _inputs: tuple

    def _init(self, inputs: tuple, addend: Optional[Tensor], versions: tuple) -> None:
        self._inputs, self._addend, self._value = inputs, addend, None
        # (the versions of inputs and addend as the model made them: they must not change)
        self._versions = versions or _versions(*inputs, addend)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def _computed_with(self, relu: bool) -> Tensor:
        raise NotImplementedError

    def _with_addend(self, addend: Tensor, versions: tuple) -> "PendingPostOps":
        """A new pending result: this one plus `addend`."""
        raise NotImplementedError

    def result(self, relu: bool = False) -> Tensor:
        """The result plus the addend, then ReLU if `relu`, as a plain tensor."""
        self._check_unwritten()
        return self._computed_with(relu)

    def _check_unwritten(self) -> None:
        if _versions(*self._inputs, self._addend) != self._versions:
            raise PendingInputWritten(f"{self._name()}'s input or addend was written in place")

    def _name(self) -> str:
        return type(self).__name__

    @property
    def inputs(self) -> tuple:
        """The tensors computing it reads (its addend aside)."""
        return self._inputs

    @property
    def computed(self) -> bool:
        """Whether the result was computed (anything may have written into it since)."""
        return self._value is not None

    def materialize(self, relu: bool = False) -> Tensor:
        """The result, computed once; `relu` (while not computed yet): ReLU applied."""
        if self._value is None:
            self._value = self.result(relu)
            self._release()
        return self._value

    def point_rows(self, points: int) -> Optional[Tensor]:
        """A point's rows of a tensor with the result's (K·B, …) shape, dtype and layout, K =
        `points`, where one is at hand without computing (else None)."""
        return None

    def _release(self) -> None:
        """Drop what computing needed (the result is kept)."""
        self._inputs, self._addend = (), None

    def _joined(self, func, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """The result of `func` joined into this one, or None where it cannot be: a ReLU
        (in place too), or the addition of a plain tensor of the same shape."""
        if self.computed:
            return None
        if func in RELU and len(args) == 1 and set(kwargs) <= {"inplace"}:
            in_place = func in _IN_PLACE or kwargs.get("inplace", False)
            return self.materialize(relu=True) if in_place else self.result(relu=True)
        if func in _ADD and len(args) == 2 and not kwargs and self._addend is None:
            other = _computed(args[1] if args[0] is self else args[0])
            if (type(other) is not Tensor or other.shape != self.shape or other.dtype != self.dtype
                    or other.device != self.device or self.computed or other.is_inference()
                    or (other.requires_grad and torch.is_grad_enabled())):
                return None
            if func in _IN_PLACE:  # (pending += other: self is the sum from now on)
                if args[0] is not self:
                    return None
                self._addend, self._versions = other, (*self._versions, *_versions(other))
                return self
            return self._with_addend(other, (*self._versions, *_versions(other)))
        return None

    @classmethod
    def _join(cls, func, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """A ReLU or an addition joined into the result (`_joined`)."""
        if func in RELU or func in _ADD:  # (each pending operand asked in turn: a ReLU'd batch norm refuses)
            for pending in [a for a in args[:2] if isinstance(a, PendingPostOps)]:
                joined = None if pending.computed else pending._joined(func, args, kwargs)
                if joined is not None:
                    return joined
        return None


class InputMap(NamedTuple):
    """What a convolution applies to its input rows first: x·scale + shift per point and
    channel ((K_active, C_in) each), then max(·, 0) if `relu`."""

    scale: Tensor
    shift: Tensor
    relu: bool


class PendingConvolution(PendingPostOps):
    """(K_active·B, C_out, …) output of a convolution with each point's own weight.

    points: (K_active, B, C_in, …) input rows; weight: (K_active, C_out, C_in/groups, …);
    bias: (K_active, C_out) or None; conv: the nn.Conv*d whose `_conv_forward` runs it;
    input_map: applied to the rows first (only where `winograd_conv3x3` computes it), or None.
    """

    @staticmethod
    def of(conv: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> "PendingConvolution":
        """conv's pending output on x's (K_active·B, C_in, …) rows (K_active: weight's
        first dimension). A pending batch norm x (`PendingAffine`, ReLU'd or not, no addend)
        stays uncomputed where Winograd computes conv: its map runs in the convolution's input
        step (W2's statistics pass: one of a block's two batch-norm passes fewer)."""
        if isinstance(x, PendingAffine):
            mapped = x.input_map(len(weight))
            if mapped is not None and _winograd_applies(conv, mapped[0][0], weight, bias, None):
                points, input_map, versions = mapped
                return PendingConvolution(conv, points, weight, bias, versions=versions, input_map=input_map)
        return PendingConvolution(conv, fold(x, len(weight)), weight, bias)

    @staticmethod
    def __new__(cls, conv: nn.Module, points: Tensor, weight: Tensor, bias: Optional[Tensor],
                addend: Optional[Tensor] = None, versions: tuple = (),
                input_map: Optional[InputMap] = None) -> "PendingConvolution":
        shape = _output_shape(conv, (points.shape[0] * points.shape[1], *points.shape[2:]))
        layout = torch.channels_last if len(shape) == 4 and _channels_last(points[0]) else torch.contiguous_format
        t = Tensor._make_wrapper_subclass(cls, shape, strides=_strides(shape, layout), dtype=points.dtype,
                                          device=points.device)
        t._conv, t._weight, t._bias, t._input_map = conv, weight, bias, input_map
        t._init((points,), addend, versions)
        return t

    def folded(self, scale: Tensor, shift: Tensor) -> "PendingConvolution":
        """Each point's output channels scaled by (K_active, C_out) `scale` and shifted by
        `shift`, folded into its weight and bias; still pending."""
        assert self.foldable
        weight = self._weight * scale.reshape(*scale.shape, *([1] * (self._weight.dim() - 2)))
        bias = shift if self._bias is None else torch.addcmul(shift, self._bias, scale)
        return PendingConvolution(self._conv, self._inputs[0], weight, bias, versions=self._versions,
                                  input_map=self._input_map)

    @property
    def foldable(self) -> bool:
        """Whether a per-channel affine map can fold into the weights: not computed, no addend."""
        return self._value is None and self._addend is None

    def _name(self) -> str:
        return type(self._conv).__name__

    def _with_addend(self, addend: Tensor, versions: tuple) -> "PendingConvolution":
        return PendingConvolution(self._conv, self._inputs[0], self._weight, self._bias, addend, versions,
                                  self._input_map)

    def computed_with_moments(self) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """(result, mean, variance) where Winograd computes the result (else None): each
        point's per-channel mean and biased variance of its rows, (K_active, C_out) float64
        each, gathered in the same pass (a batch norm's statistics without one of its own).
        The result is kept as if materialized."""
        if self.computed or not self._winograd():
            return None
        self._check_unwritten()
        moments = torch.empty(len(self._weight), 2, self.shape[1], dtype=torch.float64, device=self.device)
        self._value = self._by_winograd(False, moments)
        self._release()
        return self._value, moments[:, 0], moments[:, 1]

    def _winograd(self) -> bool:
        return _winograd_applies(self._conv, self._inputs[0][0], self._weight, self._bias, self._addend)

    def _by_winograd(self, relu: bool, moments: Optional[Tensor] = None) -> Tensor:
        """The result by one `winograd_conv3x3` call for every point, each its own weight on
        its own rows (W2 in groups of 4 points: a call a point took 0.46 ms a point at 64
        channels, one for all 0.36; the threads stood idle at the end of each point's short
        call). `moments`: (K_active, 2, C_out) float64 that receives each point's mean and
        biased variance, or None."""
        (points,), mapped = self._inputs, self._input_map
        into = torch.empty(self.shape, dtype=self.dtype, device=self.device, memory_format=torch.channels_last)
        scale, shift = (mapped.scale, mapped.shift) if mapped is not None else (None, None)
        _WINOGRAD_OUT(points.flatten(0, 1), self._weight, self._bias, self._conv.padding, self._addend, relu, scale,
                      shift, mapped is not None and mapped.relu, out=into, moments=moments)
        return into

    @classmethod
    def _join(cls, func, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """As PendingPostOps, and an activation oneDNN applies as it writes the output
        (`_POST_OPS`) on a result it computes."""
        if args and isinstance(args[0], PendingConvolution):
            activated = args[0]._activated(_post_op(func, args, kwargs))
            if activated is not None:
                return activated
        return super()._join(func, args, kwargs)

    def _activated(self, post_op: Optional[tuple]) -> Optional[Tensor]:
        """The result through `post_op` (`_post_op`'s), each point's convolution by oneDNN;
        None where it does not compute it so (no post-op, computed, an addend, Winograd)."""
        if post_op is None or self.computed or self._addend is not None or self._input_map is not None \
                or not _onednn_takes(self._conv, self._inputs[0][0], self._weight, self._bias) or self._winograd():
            return None
        self._check_unwritten()
        *post, in_place = post_op
        value = self._each_point(self._inputs[0], lambda rows, weight, bias, _addend: _ONEDNN_POINTWISE(
            rows, weight, bias, *_geometry(self._conv), *post))
        if in_place:  # (the pending result is that value from now on)
            self._value = value
            self._release()
        return value

    def _computed_with(self, relu: bool) -> Tensor:
        if self._winograd():
            return self._by_winograd(relu)
        (points,), mapped = self._inputs, self._input_map
        if mapped is not None:  # (an addend that joined since rules Winograd out)
            points = fold(channel_affine(points.flatten(0, 1), mapped.scale, mapped.shift, None, mapped.relu),
                          len(points))
        return self._each_point(points, lambda rows, weight, bias, addend: _convolve(self._conv, rows, weight, bias,
                                                                                    addend, relu))

    def _each_point(self, points: Tensor, convolve) -> Tensor:
        """convolve(rows, weight, bias, addend) of each point's (K_active, B, …) `points`,
        its own weight, bias and addend rows (or None), joined into (K_active·B, …)."""
        # (each point's operands as views taken in one call each)
        k, batch = len(points), points.shape[1]
        biases = self._bias.unbind(0) if self._bias is not None else (None,) * k
        addends = self._addend.split(batch) if self._addend is not None else (None,) * k
        outs = [convolve(rows, weight, bias, addend)
                for rows, weight, bias, addend in zip(points.unbind(0), self._weight.unbind(0), biases, addends)]
        return outs[0] if k == 1 else torch.cat(outs)

    def _release(self) -> None:
        super()._release()
        self._weight = self._bias = self._input_map = None


class PendingAffine(PendingPostOps):
    """(K_active·B, C, …) rows times each point's per-channel scale plus its shift: a batch
    norm with its statistics folded in (`mlifast.ops.channel_affine`, CPU float32/64).

    rows: (K_active·B, C, …); scale, shift: (K_active, C) in the rows' dtype, or (K_active·B, C)
    (a group norm's: each example its own); relu: a ReLU after it, joined while there is no
    addend (kept pending for a convolution to take in, `PendingConvolution.of`).
    """

    @staticmethod
    def __new__(cls, rows: Tensor, scale: Tensor, shift: Tensor, addend: Optional[Tensor] = None,
                versions: tuple = (), relu: bool = False) -> "PendingAffine":
        dense = rows.is_contiguous() or (rows.dim() == 4 and rows.is_contiguous(memory_format=torch.channels_last)) \
            or (rows.dim() == 5 and rows.is_contiguous(memory_format=torch.channels_last_3d))  # (kept by the op)
        strides = rows.stride() if dense else _strides(tuple(rows.shape), torch.contiguous_format)
        t = Tensor._make_wrapper_subclass(cls, rows.shape, strides=strides, dtype=rows.dtype, device=rows.device)
        t._scale, t._shift, t._relu = scale, shift, relu
        t._init((rows,), addend, versions)
        return t

    def _with_addend(self, addend: Tensor, versions: tuple) -> "PendingAffine":
        return PendingAffine(self._inputs[0], self._scale, self._shift, addend, versions)

    def _joined(self, func, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """As PendingPostOps, but a ReLU without an addend stays pending (a convolution may
        take it in), and nothing is added after it (the addition would come first)."""
        if self.computed or self._addend is not None:
            return super()._joined(func, args, kwargs)
        if func in RELU and len(args) == 1 and set(kwargs) <= {"inplace"}:
            if func in _IN_PLACE or kwargs.get("inplace", False):
                self._relu = True
                return self
            return PendingAffine(self._inputs[0], self._scale, self._shift, versions=self._versions, relu=True)
        return None if self._relu else super()._joined(func, args, kwargs)

    def input_map(self, points: int) -> Optional[tuple[Tensor, InputMap, tuple]]:
        """(K_active, B, C, …) rows, the map a convolution applies to them first, and their
        versions; None where a map cannot stand for this result (computed, with an addend, or
        with a scale for each example).
        Raises PendingInputWritten if the rows were written since."""
        if self.computed or self._addend is not None or len(self._scale) != points:
            return None
        self._check_unwritten()
        return fold(self._inputs[0], points), InputMap(self._scale, self._shift, self._relu), self._versions

    def point_rows(self, points: int) -> Tensor:
        rows = self._inputs[0]  # (its shape, dtype and layout: channel_affine keeps them)
        return rows[:rows.shape[0] // points]

    def _computed_with(self, relu: bool) -> Tensor:
        return channel_affine(self._inputs[0], self._scale, self._shift, self._addend, relu or self._relu)

    def _release(self) -> None:
        super()._release()
        self._scale = self._shift = None


_METADATA = {Tensor.size, Tensor.dim, Tensor.numel, Tensor.element_size, Tensor.is_floating_point, Tensor.__len__}
_PROPERTIES = {"shape", "dtype", "device", "ndim", "is_cpu", "is_cuda", "requires_grad", "layout", "grad_fn", "is_leaf"}
RELU = {F.relu, torch.relu, Tensor.relu, torch.relu_, Tensor.relu_}
RELU_IN_PLACE = {torch.relu_, Tensor.relu_}
_ADD = {Tensor.__add__, Tensor.__radd__, torch.add, Tensor.add, Tensor.__iadd__, Tensor.add_}
_IN_PLACE = RELU_IN_PLACE | {Tensor.__iadd__, Tensor.add_}


def _versions(*tensors: Optional[Tensor]) -> tuple:
    """Version counters of `tensors` (None skipped; an inference tensor, which has none: -1)."""
    return tuple(-1 if t.is_inference() else t._version for t in tensors if t is not None)


def _computed(value):
    return value.materialize() if isinstance(value, Pending) else value


def plain(value: Any, _path: str = "") -> Any:
    """A value as a plain tensor: a pending result computed, shared rows repeated; anything
    else as it is (map_tensors' signature)."""
    return value.materialize() if isinstance(value, Pending) else materialize(value)


def _convolve(conv: nn.Module, rows: Tensor, weight: Tensor, bias: Optional[Tensor], addend: Optional[Tensor],
              relu: bool) -> Tensor:
    """relu?(conv(rows; weight, bias) + addend?) where Winograd does not compute it: with an
    addend, on float32 CPU rows of a Conv2d, in one oneDNN primitive with the addition as
    a post-op; else as separate operations. The ReLU is an in-place pass of its own:
    oneDNN's ReLU post-op makes NaN 0."""
    if addend is not None and _onednn_takes(conv, rows, weight, bias):
        y = _ONEDNN_POINTWISE.binary(rows, addend, weight, bias, *_geometry(conv), "add", None, None, [], None)
    else:
        y = conv._conv_forward(rows, weight, bias)
        if addend is not None:
            y = y.add_(addend)
    return y.relu_() if relu else y


# `winograd_conv3x3.out` called directly: `_winograd_applies` has checked what its face would.
_WINOGRAD_OUT = torch.ops.mlifast.winograd_conv3x3.out

# Devices whose 3×3 stride-1 convolutions run `winograd_conv3x3` (its compiled kernel:
# on the CPU 1.7–1.9× oneDNN's direct convolution on W2's shapes; W2 3.17 → 2.70 s in one
# process when it came, before the ninth session's changes to the kernel).
WINOGRAD_DEVICES = {"cpu"}
# ... from this many 4 × 4 output tiles a point and up to this many input × output channels
# (benchmarks/winograd_conv.py, 2 cores, a call a point): each point's weight is
# transformed, 36·C_in·C_out floats that every block of 48 tiles reads again. (Measured
# before a group's points took one call, which keeps both threads busy to the end.)
# Against oneDNN (ninth session's kernel): 1.7–1.9× from 256 tiles at 16–128 channels
# (8×128×28×28: 1.9×; 16×256×14×14: 1.4×); at 64 tiles 1.6× (16 channels), 1.3× (32),
# 1.2× (64); at 32 tiles 1.5×, 1.2×, 1.0×; 0.95× at 128 tiles of 256, 0.65× at 128 tiles
# of 512, 0.2× at 32 tiles of 512.
WINOGRAD_MIN_TILES = 64
WINOGRAD_MAX_CHANNEL_PAIRS = 128 * 128


def _winograd_applies(conv: nn.Module, rows: Tensor, weight: Tensor, bias: Optional[Tensor],
                      addend: Optional[Tensor]) -> bool:
    """Whether `winograd_conv3x3` computes conv on rows: a plain Conv2d of 3×3 zero-padded
    kernels, stride and dilation 1, one group, channels multiples of 16 (their product
    within WINOGRAD_MAX_CHANNEL_PAIRS), at least WINOGRAD_MIN_TILES output tiles, on
    channels-last float32 rows, no tensor carrying derivatives (forward mode included: the
    op has none), on a device of WINOGRAD_DEVICES with the op compiled."""
    return (_plain_conv2d(conv) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and rows.dtype == torch.float32 and _channels_last(rows)
            and rows.device.type in WINOGRAD_DEVICES and compiled("winograd_conv3x3", rows.device.type)
            and conv.in_channels % WINOGRAD_CHANNEL_MULTIPLE == 0 and conv.out_channels % WINOGRAD_CHANNEL_MULTIPLE == 0
            and conv.in_channels * conv.out_channels <= WINOGRAD_MAX_CHANNEL_PAIRS
            and _output_tiles(conv, rows) >= WINOGRAD_MIN_TILES and not carries_derivatives(rows, weight, bias, addend))


def winograd_takes(conv: nn.Module, x: Tensor, points: int) -> bool:
    """Whether `winograd_conv3x3` would compute conv on each point's rows of x (K·B, C, …),
    K = `points`, as a PendingConvolution of them would (for a pending result, rows of its
    layout: `point_rows`)."""
    if isinstance(x, Pending):
        rows = x.point_rows(points) if isinstance(x, PendingPostOps) and not x.computed else None
        return rows is not None and _winograd_applies(conv, rows, None, None, None)
    return _winograd_applies(conv, x[:x.shape[0] // points], None, None, None)


def _output_tiles(conv: nn.Module, rows: Tensor) -> int:
    """4 × 4 output tiles of a 3 × 3 stride-1 conv on (N, C, H, W) rows."""
    n, _, h, w = rows.shape
    return n * -(-(h + 2 * conv.padding[0] - 2) // 4) * -(-(w + 2 * conv.padding[1] - 2) // 4)


def _plain_conv2d(conv: nn.Module) -> bool:
    """A Conv2d computing what nn.Conv2d does (a subclass given ConvRule may override
    `_conv_forward`: a fixed mask of its own)."""
    return isinstance(conv, nn.Conv2d) and type(conv)._conv_forward is nn.Conv2d._conv_forward


# oneDNN's convolution with post-ops, as Inductor calls it (absent from builds without oneDNN).
_ONEDNN_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None


def _onednn_takes(conv: nn.Module, rows: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether oneDNN's convolution with post-ops computes conv on one point's rows: a plain
    zero-padded Conv2d on float32 CPU images, weight and bias, outside autocast (which
    would compute it in its own dtype)."""
    return (_ONEDNN_POINTWISE is not None and _plain_conv2d(conv) and rows.dim() == 4 and rows.is_cpu
            and rows.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not torch.is_autocast_enabled("cpu"))


def _geometry(conv: nn.Module) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


# Activations (other than ReLU, which every form joins) that oneDNN applies to a
# convolution's output as it writes it, the same values (NaN and ±inf) as PyTorch's:
# function → (its post-op, the parameters after the input by position). MobileNet V3's
# Hardswish (8 % faster at 64 px), EfficientNet's SiLU. Not oneDNN's hardtanh (ReLU6),
# hardsigmoid or LeakyReLU of slope 0, which make NaN a number, nor its erf GELU, which
# makes inf NaN.
_POST_OPS = {F.silu: ("swish", ("inplace",)), F.hardswish: ("hardswish", ("inplace",)),
             F.gelu: ("gelu", ("approximate",)), F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
             **{f: ("sigmoid", ()) for f in (torch.sigmoid, Tensor.sigmoid, F.sigmoid, torch.sigmoid_, Tensor.sigmoid_)},
             **{f: ("tanh", ()) for f in (torch.tanh, Tensor.tanh, F.tanh, torch.tanh_, Tensor.tanh_)}}
_IN_PLACE_POST_OPS = {torch.sigmoid_, Tensor.sigmoid_, torch.tanh_, Tensor.tanh_}


def _post_op(func, args: tuple, kwargs: dict) -> Optional[tuple[str, list, str, bool]]:
    """(oneDNN's post-op, its scalars, its algorithm, whether in place) of an activation
    call func(x, …) on x alone (`_POST_OPS`), or None (then PyTorch's own function runs,
    and raises for arguments it refuses)."""
    if func not in _POST_OPS:
        return None
    attr, names = _POST_OPS[func]
    if len(args) - 1 > len(names):
        return None
    given = {**dict(zip(names, args[1:])), **kwargs}
    if set(given) - set(names):
        return None
    in_place = func in _IN_PLACE_POST_OPS or bool(given.get("inplace", False))
    if attr == "gelu":
        return (attr, [], "tanh", in_place) if given.get("approximate") == "tanh" else None
    if attr == "leaky_relu":
        slope = float(given.get("negative_slope", 0.01))
        return (attr, [slope], "", in_place) if slope != 0 else None
    return attr, [], "", in_place


def _output_shape(conv: nn.Module, shape: tuple) -> tuple:
    """(N, C_out, …) of `conv` on an input of `shape` (N, C_in, …)."""
    spatial = shape[2:]
    if conv.padding == "same":
        out = spatial
    else:
        padding = (0,) * len(spatial) if conv.padding == "valid" else conv.padding
        out = tuple((size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for size, pad, dilation, kernel, stride
                    in zip(spatial, padding, conv.dilation, conv.kernel_size, conv.stride))
    return (shape[0], conv.out_channels, *out)


def _channels_last(x: Tensor) -> bool:
    """Whether ATen's convolution answers `x` channels-last (it suggests that layout)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _strides(shape: tuple, layout: torch.memory_format) -> tuple:
    if layout == torch.channels_last:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
