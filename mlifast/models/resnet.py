"""CIFAR ResNets (He et al. 2016, §4.2) in the four families of the MLI study.

Follows the official code (``AtheMathmo/mli-release``, ``lib/mli/models/cifar/resnet.py``,
``fixup_resnet.py``, ``utils.py``), including its parameter names, so the state dicts of
its checkpoints have the same keys and shapes:

- ``"bn"`` (paper: BN): BatchNorm after every conv, standard init (``identity_init=False``).
- ``"bn_zero_gamma"`` (BN-I): as ``"bn"``, with the γ of the last BN of every residual
  branch (``bn2.weight``) set to 0, so every block starts as relu(shortcut(x)).
- ``"no_bn"`` (NBN-I): no normalisation; each branch is multiplied by a learnable scalar
  ``res_scale`` initialised to 0.
- ``"fixup"`` (NBN-F): Fixup (Zhang, Dauphin & Ma, ICLR 2019): no normalisation; scalar
  biases before each conv, activation and the final linear layer, a scalar multiplier
  ``scale`` (init 1) per branch, the branch's last conv and the final linear layer
  zero-initialised, its first conv He-normal scaled by L^(-1/(2m-2)) = L^(-1/2)
  (L residual branches, m = 2 layers per branch).

Architecture: a 3×3 conv stem with ``width`` channels, three stages of n basic blocks with
``width``, 2·``width``, 4·``width`` channels (stride 2 at the start of stages 2 and 3),
global average pooling and a Linear classifier; depth = 6n + 2.

Shortcuts are option A, as in the official code: where a block downsamples, the
shortcut subsamples (``x[:, :, ::2, ::2]``), followed in the BN families by
a BatchNorm over the input channels (``downsample.bn0``), then zero channels are
concatenated up to the block's width. It has no conv. Other blocks use the identity.

All convs are bias-free. Init: convs Kaiming-normal (fan_out, relu), BN γ = 1, β = 0,
the Linear classifier PyTorch default (``"bn"``, ``"bn_zero_gamma"``, ``"no_bn"``); for
``"fixup"`` the stem conv keeps the PyTorch default init, as in the official code.

No operation is in place, so the models work under autograd, forward-mode AD and
:func:`mlifast.interpolate`. This module depends only on torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FAMILIES = ("bn", "bn_zero_gamma", "no_bn", "fixup")
"""The four model families of the paper's CIFAR study."""

PAPER_LABELS = {"bn": "BN", "bn_zero_gamma": "BN-I", "no_bn": "NBN-I", "fixup": "NBN-F"}
"""Family → the label the paper's tables use (also accepted as ``family``)."""

_ALIASES = {**{f: f for f in FAMILIES}, **{label.lower(): f for f, label in PAPER_LABELS.items()}}


def _family(family: str) -> str:
    key = family.lower() if isinstance(family, str) else family
    if key not in _ALIASES:
        raise ValueError(
            f"mlifast.models.resnet: unknown family {family!r}; choose one of {list(FAMILIES)} "
            f"(or the paper's labels {list(PAPER_LABELS.values())})"
        )
    return _ALIASES[key]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class Downsample(nn.Module):
    """Option-A shortcut: subsample by ``stride`` (every stride-th row and column, the
    official code's ``x[:, :, ::2, ::2]``), [BN over the input channels], then zero-pad the
    channels from ``in_planes`` to ``out_planes``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"an option-A shortcut cannot reduce channels ({in_planes} → {out_planes})")
        self.extra, self.stride = out_planes - in_planes, stride
        self.bn0 = nn.BatchNorm2d(in_planes) if batch_norm else None

    def extra_repr(self) -> str:
        return f"option A: stride {self.stride}, zero-pad {self.extra} channels"

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        if self.bn0 is not None:
            x = self.bn0(x)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """relu(branch(x) + shortcut(x)), branch = conv3x3 → [BN] → relu → conv3x3 → BN or ·res_scale.

    With ``batch_norm=False`` the branch ends with a learnable scalar ``res_scale`` (shape
    (1,), initialised to 0 by :class:`ResNet` for ``"no_bn"``) instead of ``bn2``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, batch_norm: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes) if batch_norm else None
        self.conv2 = _conv3x3(planes, planes)
        if batch_norm:
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            self.res_scale = nn.Parameter(torch.zeros(1))
        self.downsample = (
            Downsample(in_planes, planes, stride, batch_norm) if stride != 1 or in_planes != planes else None
        )

    def branch(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        if self.bn1 is not None:
            out = self.bn1(out)
        out = self.conv2(F.relu(out))
        return self.bn2(out) if self.bn1 is not None else self.res_scale * out

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class FixupBasicBlock(nn.Module):
    """A Fixup block: relu(conv2(relu(conv1(x + b1a) + b1b) + b2a) · scale + b2b + shortcut(x + b1a)).

    ``bias1a``, ``bias1b``, ``bias2a``, ``bias2b`` (init 0) and ``scale`` (init 1) are
    scalar parameters of shape (1,). The shortcut is option A without BN.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.conv2 = _conv3x3(planes, planes)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        self.downsample = (
            Downsample(in_planes, planes, stride, batch_norm=False) if stride != 1 or in_planes != planes else None
        )

    def branch(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x + self.bias1a) + self.bias1b)
        return self.conv2(out + self.bias2a) * self.scale + self.bias2b

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x + self.bias1a)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet with ``blocks_per_stage`` basic blocks in each of its 3 stages.

    Parameter names (as in the official code): ``conv1``, ``bn1`` (BN families) or
    ``bias1`` (Fixup, after the stem conv), ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,
    res_scale,downsample.bn0,bias1a,bias1b,bias2a,scale,bias2b}``, ``bias2`` (Fixup,
    before ``fc``), ``fc``. Build it with :func:`resnet` or :func:`resnet20` … .
    """

    def __init__(
        self,
        blocks_per_stage: int,
        family: str = "bn",
        num_classes: int = 10,
        width: int = 16,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        family = _family(family)
        for name, v in (("blocks_per_stage", blocks_per_stage), ("num_classes", num_classes),
                        ("width", width), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"mlifast.models.resnet: {name} must be a positive int, got {v!r}")
        self.family = family
        self.num_residual_branches = 3 * blocks_per_stage
        fixup, batch_norm = family == "fixup", family in ("bn", "bn_zero_gamma")

        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width) if batch_norm else None
        self.bias1 = nn.Parameter(torch.zeros(1)) if fixup else None
        planes = width
        for stage in range(3):
            out_planes = width * 2**stage
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(FixupBasicBlock(planes, out_planes, stride) if fixup
                              else BasicBlock(planes, out_planes, stride, batch_norm))
                planes = out_planes
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.bias2 = nn.Parameter(torch.zeros(1)) if fixup else None
        self.fc = nn.Linear(planes, num_classes)
        self._init_weights()

    def blocks(self) -> list[nn.Module]:
        """The residual blocks, in order."""
        return [b for layer in (self.layer1, self.layer2, self.layer3) for b in layer]

    @torch.no_grad()
    def _init_weights(self) -> None:
        if self.family == "fixup":
            # Zhang et al. 2019 (and the official code): He-normal scaled by L^(-1/(2m-2)),
            # m = 2, on each branch's first conv; its last conv and the classifier at zero.
            for block in self.blocks():
                w = block.conv1.weight
                std = math.sqrt(2.0 / (w.shape[0] * w.shape[2] * w.shape[3])) * self.num_residual_branches ** -0.5
                nn.init.normal_(w, mean=0.0, std=std)
                nn.init.zeros_(block.conv2.weight)
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks():
            if self.family == "bn_zero_gamma":
                nn.init.zeros_(block.bn2.weight)
            elif self.family == "no_bn":
                nn.init.zeros_(block.res_scale)

    def features(self, x: Tensor) -> Tensor:
        """The pooled features fed to ``fc`` (before Fixup's ``bias2``), shape (B, 4·width)."""
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        if self.bias1 is not None:
            x = x + self.bias1
        x = self.layer3(self.layer2(self.layer1(F.relu(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        if self.bias2 is not None:
            x = x + self.bias2
        return self.fc(x)


def resnet(depth: int, family: str = "bn", num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNet:
    """A CIFAR ResNet of ``depth`` = 6n + 2 layers (20, 32, 44, 56, 110, …) in ``family``.

    Args:
        depth: 6n + 2 with n ≥ 1 (n blocks per stage).
        family: ``"bn"``, ``"bn_zero_gamma"``, ``"no_bn"`` or ``"fixup"`` (or the paper's
            labels ``"BN"``, ``"BN-I"``, ``"NBN-I"``, ``"NBN-F"``); see the module doc.
        num_classes: outputs (10 for CIFAR-10, 100 for CIFAR-100).
        width: channels of the first stage (16 in the paper); stages have width, 2·width, 4·width.
        in_channels: input channels (3 for CIFAR; 1 for 28×28 MNIST-like inputs).

    Raises:
        ValueError: depth not of the form 6n + 2, an unknown family, or a non-positive size.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"mlifast.models.resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}"
        )
    return ResNet((depth - 2) // 6, family, num_classes=num_classes, width=width, in_channels=in_channels)


def resnet20(family: str = "bn", num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNet:
    """ResNet-20 (3 blocks per stage, ≈ 0.27M parameters with BN); see :func:`resnet`."""
    return resnet(20, family, num_classes, width, in_channels)


def resnet32(family: str = "bn", num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNet:
    """ResNet-32 (5 blocks per stage); see :func:`resnet`."""
    return resnet(32, family, num_classes, width, in_channels)


def resnet44(family: str = "bn", num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNet:
    """ResNet-44 (7 blocks per stage); see :func:`resnet`."""
    return resnet(44, family, num_classes, width, in_channels)


def resnet56(family: str = "bn", num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNet:
    """ResNet-56 (9 blocks per stage); see :func:`resnet`."""
    return resnet(56, family, num_classes, width, in_channels)


def resnet110(family: str = "bn", num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNet:
    """ResNet-110 (18 blocks per stage; in the official code, not in the paper's grids); see :func:`resnet`."""
    return resnet(110, family, num_classes, width, in_channels)
