"""Fused multi-point operations: compiled kernels behind `torch.ops.mlifast`, each with
a pure-PyTorch reference (`*_reference`) that is the oracle of the tests."""
from mlifast.ops.linear import multipoint_linear, multipoint_linear_reference

__all__ = ["multipoint_linear", "multipoint_linear_reference"]
