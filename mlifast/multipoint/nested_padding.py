"""nn.TransformerEncoder's nested-tensor path, followed in the multi-point copy.

Given a padding mask, in eval mode and without autograd, PyTorch's TransformerEncoder
runs its batch as a nested tensor and gives exactly 0 at every padded position (its final
norm's output of 0 where it has one), where its layer-by-layer path computes values there.
The copy never takes the nested path (its tensors are mlifast's subclasses), so a hook on
each of its encoders sets the padded positions so wherever PyTorch would take that path,
by the conditions of `TransformerEncoder.forward` (the model's own outputs there, and
whatever it makes of them: a mean over all positions, differ by a few percent otherwise).
With autograd, whether the user's input to the encoder requires grad decides too: taken
to be so where a module registered before the encoder has a trainable parameter.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from mlifast.multipoint.pending import plain
from mlifast.multipoint.rule import forward_is_inherited

_DEVICES = ("cpu", "cuda", "xpu")


def follow_nested_padding(copied: dict[str, nn.Module], originals: dict[str, nn.Module]) -> None:
    """Hooks on every nn.TransformerEncoder among the `copied` modules (its forward
    PyTorch's own) that give its output the nested path's values at padded positions
    wherever the user's encoder at the same path in `originals` would take that path."""
    paths = list(originals)
    for path, encoder in copied.items():
        if forward_is_inherited(encoder, nn.TransformerEncoder) and getattr(encoder, "use_nested_tensor", False):
            # With autograd, PyTorch's path depends on whether its first layer's parameters or
            # its input require grad: the input does where a trainable module comes before it
            # (taken in the order the modules were registered).
            before = [originals[p] for p in paths[:paths.index(path)]]
            first = originals[path].layers[0]
            needs_grad = any(p.requires_grad for m in before + [first] for p in m.parameters(recurse=m is first))
            encoder.register_forward_hook(functools.partial(_set_padded, needs_grad=needs_grad), with_kwargs=True)


def _set_padded(encoder: nn.TransformerEncoder, args: tuple, kwargs: dict, out: Tensor, needs_grad: bool) -> Any:
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
    out = plain(out)
    at_padded = 0.0 if encoder.norm is None else plain(encoder.norm(torch.zeros_like(out)))  # (norm after padding)
    batch_first = encoder.layers[0].self_attn.batch_first
    return torch.where((padded if batch_first else padded.t()).unsqueeze(-1), at_padded, out)


def _nested(encoder: nn.TransformerEncoder, src: Tensor, needs_grad: bool) -> bool:
    """PyTorch's conditions for the nested path but the mask's (see TransformerEncoder.forward)."""
    return (torch.backends.mha.get_fastpath_enabled() and not encoder.layers[0].training and src.dim() == 3
            and not src.is_nested and not torch.is_autocast_enabled() and src.device.type in _DEVICES
            and not (torch.is_grad_enabled() and (needs_grad or src.requires_grad))
            and not (getattr(encoder, "mask_check", True) and torch.compiler.is_compiling()))
