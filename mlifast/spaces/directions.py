"""Random directions in weight space, with the filter normalisation of Li et al. (2018),
"Visualizing the Loss Landscape of Neural Nets".

A direction is a state dict with one tensor per floating-point entry of the model, of the
same shape, dtype and device; it is unitless (a step of 1 along it moves each normalised
filter by that filter's own norm).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .span import StateLike, read_state

_EPS = 1e-10  # guards a zero-norm random filter, as in Li et al.'s reference code
_RUNNING_STATS = ("running_mean", "running_var")


def _buffer_names(obj: StateLike, state: dict[str, Tensor]) -> set[str]:
    """Entries that are buffers: from ``named_buffers`` for a Module; for a bare state
    dict, the names ending in ``running_mean`` / ``running_var``."""
    if isinstance(obj, nn.Module):
        return {n for n, _ in obj.named_buffers(remove_duplicate=False)}
    return {k for k in state if k.endswith(_RUNNING_STATS)}


def _rescale(d: Tensor, w: Tensor, per_filter: bool) -> Tensor:
    """Rescale ``d`` so that each filter (slice along dim 0 when ``per_filter``, else the
    whole tensor) has the Frobenius norm of the matching slice of ``w``. float64 in/out."""
    if d.numel() == 0:
        return d
    if per_filter:
        rows = d.shape[0]
        wn = w.reshape(rows, -1).norm(dim=1)
        dn = d.reshape(rows, -1).norm(dim=1)
        return d * (wn / (dn + _EPS)).reshape(rows, *([1] * (d.dim() - 1)))
    return d * (w.norm() / (d.norm() + _EPS))


def random_direction(
    model_or_state: StateLike,
    *,
    seed: Optional[int],
    normalization: Optional[str] = "filter",
    ignore: Optional[str] = "biasbn",
    generator: Optional[torch.Generator] = None,
) -> dict[str, Tensor]:
    """A Gaussian random direction for ``model_or_state``.

    Args:
        model_or_state: ``nn.Module`` or state dict θ.
        seed: seeds a fresh CPU ``torch.Generator``; the result depends only on the seed
            and θ's keys/shapes, never on the global RNG. Must be None iff ``generator``
            is given.
        normalization: ``"filter"`` — for a tensor with ≥ 2 dims each output filter d_i
            (slice along dim 0) becomes d_i · ‖θ_i‖ / (‖d_i‖ + 1e-10) (Frobenius norms);
            tensors with ≤ 1 dim that are not zeroed by ``ignore`` are one filter.
            ``None`` — raw N(0, 1) entries.
        ignore: ``"biasbn"`` — tensors with ≤ 1 dim (biases, norm weights) get a zero
            direction; ``None`` — they are kept. Buffers (running statistics) are zero
            in both cases.
        generator: draw from this generator (on its device) instead of seeding one.

    Returns:
        name -> tensor for every floating-point entry of θ, in θ's order, with θ's
        shape, dtype and device. Non-floating entries are omitted. Entries that share
        storage in θ (tied weights) get the same direction.

    Every floating entry consumes its draw from the generator even when it ends up zero,
    so a weight's direction does not depend on ``ignore``.
    """
    if normalization not in ("filter", None):
        raise ValueError(f"normalization must be 'filter' or None; got {normalization!r}.")
    if ignore not in ("biasbn", None):
        raise ValueError(f"ignore must be 'biasbn' or None; got {ignore!r}.")
    if generator is None:
        if seed is None:
            raise ValueError("pass seed=<int> (or generator=<torch.Generator> with seed=None).")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
    elif seed is not None:
        raise ValueError("pass either seed or generator, not both (use seed=None).")

    state = read_state(model_or_state, "model_or_state")
    buffers = _buffer_names(model_or_state, state)
    out: dict[str, Tensor] = {}
    seen: dict[tuple, str] = {}  # storage identity -> first key, for tied weights
    for k, w in state.items():
        if not w.is_floating_point():
            continue
        ident = (w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, str(w.device))
        if w.numel() > 0 and ident in seen:
            out[k] = out[seen[ident]].clone()
            continue
        seen[ident] = k
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64, device=generator.device)
        d = d.to(w.device)
        if k in buffers or (ignore == "biasbn" and w.dim() <= 1):
            d = torch.zeros_like(d)
        elif normalization == "filter":
            d = _rescale(d, w.to(torch.float64), per_filter=w.dim() >= 2)
        out[k] = d.to(w.dtype)
    return out
