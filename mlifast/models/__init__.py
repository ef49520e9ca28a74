"""Models of the MLI study (Lucas et al. 2021): the MNIST MLP and the CIFAR ResNet families.

    from mlifast.models import mlp, resnet20
    net = mlp(hidden=(1024, 1024), batch_norm=True, activation="tanh")
    res = resnet20(family="fixup", num_classes=100)

Parameter names follow the official code (``AtheMathmo/mli-release``), so its
checkpoints' state dicts load (for the MLP, after stripping ``FCNet``'s ``layers.`` prefix).
This package depends only on torch.
"""
from mlifast.models.mlp import ACTIVATIONS, mlp
from mlifast.models.resnet import (
    FAMILIES, PAPER_LABELS, BasicBlock, Downsample, FixupBasicBlock, ResNet, resnet, resnet20, resnet32,
    resnet44, resnet56, resnet110,
)

__all__ = [
    "ACTIVATIONS", "FAMILIES", "PAPER_LABELS", "BasicBlock", "Downsample", "FixupBasicBlock", "ResNet",
    "mlp", "resnet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
]
