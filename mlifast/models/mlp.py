"""The fully connected classifier of the MLI study (MNIST / Fashion-MNIST).

Follows ``FCNet`` of the official code (``AtheMathmo/mli-release``,
``lib/mli/models/fcnet.py``): Linear → [BatchNorm1d] → activation for every hidden
layer, BN *before* the activation and never on the output, PyTorch default init.

This module depends only on torch.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
"""Activation names accepted by :func:`mlp` (the paper's grid uses relu, tanh, sigmoid)."""


def mlp(
    hidden: Sequence[int] = (1024, 1024),
    batch_norm: bool = False,
    activation: str = "relu",
    in_features: int = 784,
    num_classes: int = 10,
) -> nn.Sequential:
    """A multilayer perceptron: flatten, then Linear → [BatchNorm1d] → activation per hidden layer, then Linear.

    The paper's grid is ``hidden`` = (1024,)·d for d = 2 … 5 hidden layers, or
    (1024, h) for the width study; activation relu, tanh or sigmoid; BN on or off.
    ``hidden=()`` gives a linear classifier.

    Layout (the state-dict keys). The input is flattened by a parameter-free child
    named ``flatten``; the other children are named ``"0"``, ``"1"``, … in order, so the
    parameter keys are exactly those of the plain ``nn.Sequential(Linear, [BN], act, …,
    Linear)`` without a flatten:

    ============================  ========================================================
    without BN                    ``0`` Linear, ``1`` act, ``2`` Linear, ``3`` act, …, ``2d`` Linear
    with BN                       ``0`` Linear, ``1`` BN, ``2`` act, ``3`` Linear, ``4`` BN, …, ``3d`` Linear
    ============================  ========================================================

    e.g. ``mlp(hidden=(128, 128), in_features=32)`` has keys ``0.weight``, ``0.bias``,
    ``2.*``, ``4.*`` and loads the state dict of ``nn.Sequential(nn.Linear(32, 128),
    nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))``. With BN the
    indices are those of the official ``FCNet.layers`` (strip the ``layers.`` prefix).
    Index the model by name (``model.flatten``, ``model[1]`` is the first Linear since
    position 0 is the flatten), or by the key in ``model._modules``.

    Args:
        hidden: widths of the hidden layers (positive ints).
        batch_norm: add ``nn.BatchNorm1d`` after each hidden Linear, before its activation.
        activation: one of :data:`ACTIVATIONS` (``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"gelu"``).
        in_features: size of the flattened input (784 = 1×28×28).
        num_classes: outputs of the last Linear.

    Raises:
        ValueError: an unknown activation or a non-positive size.
    """
    act = ACTIVATIONS.get(activation.lower() if isinstance(activation, str) else activation)
    if act is None:
        raise ValueError(
            f"mlifast.models.mlp: unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}"
        )
    sizes = [in_features, *hidden]
    for name, size in [("in_features", in_features), *(("hidden", h) for h in hidden), ("num_classes", num_classes)]:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mlifast.models.mlp: {name} sizes must be positive ints, got {size!r}")

    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers.append(nn.Linear(fan_in, fan_out))
        if batch_norm:
            layers.append(nn.BatchNorm1d(fan_out))
        layers.append(act())
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(OrderedDict([("flatten", nn.Flatten()), *((str(i), m) for i, m in enumerate(layers))]))
