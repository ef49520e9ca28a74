"""The benchmark models: the MLI paper's MNIST MLP and CIFAR ResNet-20 with batch norm,
both from mlifast.models."""
from __future__ import annotations

from torch import nn

from mlifast.models import mlp, resnet20


def mnist_mlp(hidden: int = 1024) -> nn.Sequential:
    """784-1024-1024-10 with ReLU (Lucas et al. 2021, MNIST MLP)."""
    return mlp(hidden=(hidden, hidden))


def ResNet20(width: int = 16) -> nn.Module:  # noqa: N802 — keeps the workloads' name
    """CIFAR ResNet-20 with batch norm (option-A shortcuts), 16/32/64 channels at width 16."""
    return resnet20(family="bn", width=width)
