"""Fused multi-point operations: compiled kernels behind `torch.ops.mlifast`, each with
a pure-PyTorch reference (`*_reference`) that is the oracle of the tests."""
from mlifast.ops.channels import (channel_affine, channel_affine_reference, channel_combine,
                                  channel_combine_reference, channel_moments, channel_moments_reference)
from mlifast.ops.combine import multipoint_combine, multipoint_combine_reference
from mlifast.ops.linear import multipoint_linear, multipoint_linear_reference
from mlifast.ops.relu_line import relu_line_linear, relu_line_linear_reference
from mlifast.ops.winograd import winograd_conv3x3, winograd_conv3x3_reference

__all__ = ["channel_affine", "channel_affine_reference", "channel_combine", "channel_combine_reference",
           "channel_moments", "channel_moments_reference",
           "multipoint_combine", "multipoint_combine_reference", "multipoint_linear",
           "multipoint_linear_reference", "relu_line_linear", "relu_line_linear_reference", "winograd_conv3x3",
           "winograd_conv3x3_reference"]
