"""nn.TransformerEncoder's nested-tensor path, followed in the multi-point copy.

Given a padding mask, in eval mode and without autograd, PyTorch's TransformerEncoder
runs its batch as a nested tensor and gives exactly 0 at every padded position, where its
layer-by-layer path computes values there. The copy never takes the nested path (its
tensors are mlifast's subclasses), so a hook on each of its encoders zeroes the padded
positions wherever the user's encoder would take it, by the conditions of PyTorch's
`TransformerEncoder.forward` (the model's own outputs there, and whatever it makes of
them: a mean over all positions, differ by a few percent otherwise).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mlifast.multipoint.pending import plain
from mlifast.multipoint.rule import forward_is_inherited

_DEVICES = ("cpu", "cuda", "xpu")


def follow_nested_padding(copied: dict[str, nn.Module], originals: dict[str, nn.Module]) -> None:
    """Hooks on every nn.TransformerEncoder among the `copied` modules (its forward
    PyTorch's own) that zero its output where the user's encoder at the same path in
    `originals` would give the nested path's zeros."""
    for path, encoder in copied.items():
        if forward_is_inherited(encoder, nn.TransformerEncoder) and getattr(encoder, "use_nested_tensor", False):
            first = originals[path].layers[0]
            needs_grad = any(p.requires_grad for p in first.parameters())  # (the user's parameters)
            encoder.register_forward_hook(lambda m, args, kwargs, out, g=needs_grad: _zeroed(m, args, kwargs, out, g),
                                          with_kwargs=True)


def _zeroed(encoder: nn.TransformerEncoder, args: tuple, kwargs: dict, out: Tensor, needs_grad: bool) -> Any:
    names = ("src", "mask", "src_key_padding_mask", "is_causal")
    given = dict(zip(names, args)) | kwargs
    src, mask, padding = given["src"], given.get("mask"), given.get("src_key_padding_mask")
    if padding is None or mask is not None or not _nested(encoder, src, needs_grad):
        return None
    src, padding = plain(src), plain(padding)
    padded = padding if padding.dtype == torch.bool else padding != 0
    if getattr(encoder, "mask_check", True) and not torch._nested_tensor_from_mask_left_aligned(
            src, padded.logical_not()):
        return None
    batch_first = encoder.layers[0].self_attn.batch_first
    return plain(out).masked_fill((padded if batch_first else padded.t()).unsqueeze(-1), 0.0)


def _nested(encoder: nn.TransformerEncoder, src: Tensor, needs_grad: bool) -> bool:
    """PyTorch's conditions for the nested path but the mask's (see TransformerEncoder.forward)."""
    return (torch.backends.mha.get_fastpath_enabled() and not encoder.layers[0].training and src.dim() == 3
            and not src.is_nested and not torch.is_autocast_enabled() and src.device.type in _DEVICES
            and not (torch.is_grad_enabled() and (needs_grad or src.requires_grad))
            and not (getattr(encoder, "mask_check", True) and torch.compiler.is_compiling()))
