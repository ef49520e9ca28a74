"""`evaluate()`: one pass over the data for all points of a space."""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mlifast.engine.allocator import freed_memory_kept
from mlifast.engine.batches import Forward, default_forward, inputs_and_target, to_device
from mlifast.engine.chunking import plan
from mlifast.engine.metrics import (IGNORE_INDEX, Metric, ignored_target, per_example_loss, per_example_values,
                                    resolve_metrics)
from mlifast.engine.results import Results
from mlifast.multipoint import MultiPointModel
from mlifast.spaces import Span

BN_POLICIES = ("interpolate", "recompute", "batch")


def evaluate(
    model: nn.Module,
    space: Span,
    data: Iterable,
    coords: Any = 50,
    loss: Optional[Callable] = None,
    metrics: Sequence[Union[str, Metric]] = ("accuracy",),
    bn: str = "interpolate",
    bn_data: Optional[Iterable] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    max_points_per_pass: Optional[int] = None,
    progress: bool = True,
    forward: Optional[Forward] = None,
    batch_dim: int = 0,
) -> Results:
    """Mean loss and metrics over `data` at every point `coords` of `space`, reading each
    batch once per pass of up to `max_points_per_pass` points.

    Args:
        model: any nn.Module whose state_dict matches the space (it is never modified).
        space: a Line, Plane or Span.
        data: an iterable of batches, re-iterable (e.g. a DataLoader or a list); see
            mlifast.engine.batches for how a batch calls the model.
        coords: int (evenly spaced on [0, 1] per direction), (K,) or (K, J).
        loss: loss(output, target) of one batch of examples; called with
            reduction="none" where it takes it; default cross entropy.
        metrics: "accuracy" and/or callables f(output, target) -> (N,) per-example values
            (averaged over any further dims), or a dict naming each, {"name": fn}.
            Class-index targets equal to cross entropy's (or nll_loss's) ignore_index
            (-100 unless a functools.partial sets it) are left out of that loss's mean,
            and targets of -100 out of "accuracy"'s: the loss is then cross entropy's own
            mean over the targets it counts (padded tokens, masked labels).
        bn: "interpolate" (eval mode, running statistics interpolated), "recompute"
            (each point's statistics recomputed on bn_data as update_bn would, then eval
            mode) or "batch" (each point's own batch statistics).
        bn_data: data for "recompute" (default: `data`).
        device, dtype: where and in what floating dtype to compute (default: the space's);
            floating-point inputs are cast to `dtype` when it is given.
        max_points_per_pass: points per pass over the data (default: from a memory
            budget); on the CPU each batch then runs them in cache-sized groups.
        progress: show a tqdm progress bar over batches.
        forward: forward(model, batch) -> (output, target) for other batch layouts;
            output (K, B, …): a leading K dimension, then batch-first.
        batch_dim: the dimension of inputs holding the batch (and of outputs, where their
            size there is the batch's). The loss and metrics always take outputs
            batch-first: a sequence-first model's (T, B, …) output and (T, B, …) target
            come as (K·B, T, …) each; a (B, C) output and (B,) target as they are.

    Returns:
        Results with (K,) "loss" and one (K,) entry per metric: means over examples (over
        the targets counted, where some are ignored; see `metrics`).
    """
    if bn not in BN_POLICIES:
        raise ValueError(f"mlifast: bn must be one of {BN_POLICIES}, got {bn!r}")
    for name, value in (("data", data), ("bn_data", bn_data)):
        if value is not None and iter(value) is value:
            raise TypeError(
                f"mlifast: {name} is a one-shot iterator ({type(value).__name__}); evaluate reads it "
                "more than once — pass a list or a DataLoader"
            )
    space = space.to(device=device, dtype=dtype)
    device = next(iter(space.origin.values())).device
    all_coords = space.coords_tensor(coords)
    per_example = {"loss": per_example_loss(loss), **resolve_metrics(metrics)}
    with freed_memory_kept(device):  # every pass of the call reuses the same pages
        fast = MultiPointModel(model, space, all_coords[:1], batch_dim=batch_dim).eval()
        fast.indices_shared_first = _indices_found_shared(model)
        fast.context.bn_mode = "batch" if bn == "batch" else "running"
        norms = fast.norms
        if bn == "recompute" and bn_data is None:
            bn_data = data
        chunk, fast.points_per_group = plan(fast, data, forward or default_forward, device, dtype,
                                            max_points_per_pass)

        # (2, K) per name: the sum of the values over the data set and their count, at each point
        sums = {name: torch.zeros(2, all_coords.shape[0], dtype=torch.float64) for name in per_example}
        examples = 0
        total = _length(data) + (_length(bn_data) if bn == "recompute" and norms else 0)
        n_chunks = -(-all_coords.shape[0] // chunk)
        bar = tqdm(total=total * n_chunks if total else None, disable=not progress, desc="mlifast evaluate", unit="batch")
        with torch.no_grad(), bar:
            for start in range(0, all_coords.shape[0], chunk):
                points = slice(start, start + chunk)
                fast.set_coords(all_coords[points])
                if bn == "recompute" and norms:
                    recompute_statistics(fast, norms, bn_data, forward, device, bar, dtype)
                seen = 0
                for batch in data:
                    seen += _batch_sums(fast, to_device(batch, device, dtype), forward, sums, points.start,
                                        per_example, batch_dim)
                    bar.update()
                examples = seen
    if not fast.per_point_fallback:
        _remember_indices_shared(model, fast.context.flat_indices_shared)
    if examples == 0:
        raise ValueError("mlifast: the data set is empty; evaluate needs at least one batch with one example")
    uncounted = [name for name, s in sums.items() if not s[1].all()]
    if uncounted:
        raise ValueError(
            f"mlifast: every target of the data set is one that {' and '.join(uncounted)} skip (ignore_index, "
            f"{IGNORE_INDEX} unless the loss says otherwise), so they have no value; give the data set a target "
            "to count")
    values = {name: s[0] / s[1] for name, s in sums.items()}
    _warn_non_finite(values["loss"], all_coords)
    meta = {
        "space": space.describe(),
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "examples": examples,
        "bn": bn,
        **_versions(),
    }
    return Results(all_coords, values, meta)


def recompute_statistics(fast: MultiPointModel, norms: list, bn_data, forward: Optional[Forward], device,
                         bar=None, dtype=None) -> None:
    """Each point's batch-norm statistics over bn_data, as update_bn computes them (the
    outputs dropped as each group of points computes them, without a `forward` of the user's)."""
    for m in norms:
        m.start_collecting()
    fast.context.bn_mode = "collect"
    try:
        for batch in bn_data:
            batch = to_device(batch, device, dtype)
            if forward is not None:
                forward(fast, batch)
            else:
                args, kwargs, _ = inputs_and_target(batch)
                with fast.outputs_to(lambda start, output: None):
                    fast(*args, **kwargs)
            if bar is not None:
                bar.update()
    finally:
        fast.context.bn_mode = "running"
    for m in norms:
        m.finish_collecting()


# The loss and metrics take the outputs of as many points at a time as fit in this many
# bytes (at least one point): a language model's logits over a 33k-token vocabulary at 700
# tokens take 93 MB a point, and its log-softmax over all 16 points' at once (1.5 GB, in
# fresh pages) took 11.4 s a call, over one point's at a time 3.2 s.
LOSS_BYTES = 32 << 20


def _batch_sums(fast: MultiPointModel, batch: Any, forward: Optional[Forward], sums: dict, first: int,
                per_example: dict, batch_dim: int) -> int:
    """Add each metric's per-example values on `batch` summed per point to
    sums[name][first : first + K]; returns the batch's examples. Without a `forward` of the
    user's, each group of points' outputs as the model computes them (outputs_to)."""
    if forward is not None:
        output, target = forward(fast, batch)
        return _add_sums(sums, first, output, target, per_example, 0)
    args, kwargs, target = inputs_and_target(batch)
    examples = []
    with fast.outputs_to(lambda start, output: examples.append(
            _add_sums(sums, first + start, output, target, per_example, (fast.output_batch_dims or (0,))[0]))):
        fast(*args, **kwargs)
    return examples[0]


def _add_sums(sums: dict, first: int, output: Any, target: Tensor, per_example: dict, batch_dim: int) -> int:
    """Add each metric's per-example values on (K', …) `output`, a point's batch at
    `batch_dim`, summed per point to sums[name][first : first + K']; returns the batch's
    examples."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"mlifast: the model returned {type(output).__name__}; evaluate needs a tensor of "
            "outputs — pass forward=lambda model, batch: (model(...)['logits'], target)"
        )
    step, examples = max(1, LOSS_BYTES // max(1, output[0].nbytes)), 0
    for start in range(0, output.shape[0], step):
        part = output[start:start + step]
        flat_output, flat_target = _flatten_points(part, target, batch_dim)
        n = part.shape[0]
        examples = flat_target.shape[0] // n
        for name, fn in per_example.items() if examples else ():  # (an empty batch)
            values = per_example_values(name, _called(fn, flat_output, flat_target, part, target, batch_dim),
                                        flat_output.shape[0], n, flat_target, ignored_target(fn))
            sums[name][:, first + start:first + start + n] += values.reshape(2, n, -1).sum(2).cpu()
    return examples


def _called(fn: Metric, flat_output: Tensor, flat_target: Tensor, output: Tensor, target: Tensor, batch_dim: int):
    """fn(flat_output, flat_target); where it raises and the target's batch is not the
    output's (K', …, B, …), a ValueError saying so in the user's terms (one batch), not
    in the K'·B rows the error met."""
    try:
        return fn(flat_output, flat_target)
    except Exception as e:
        batch = output.shape[1 + batch_dim] if output.dim() > 1 + batch_dim else None
        target_batch = target.shape[batch_dim if target.dim() > batch_dim else 0] if target.dim() else None
        if batch is None or target_batch == batch:
            raise
        raise ValueError(
            f"mlifast: the target holds {target_batch} examples where the model's output holds {batch} "
            f"(dim {batch_dim}); give each batch one target per example"
        ) from e


def _flatten_points(output: Tensor, target: Tensor, batch_dim: int) -> tuple[Tensor, Tensor]:
    """(K, …, B, …) output and (…, B, …) target, B at `batch_dim` → (K·B, …) each,
    point-major: batch-first, as the loss and metrics take them. A target with no more
    than `batch_dim` dimensions holds its batch in dimension 0."""
    target = target.movedim(batch_dim, 0) if target.dim() > batch_dim else target
    flat_target = target.unsqueeze(0).expand(output.shape[0], *target.shape).flatten(0, 1)
    return output.movedim(1 + batch_dim, 1).flatten(0, 1), flat_target


def _warn_non_finite(losses: Tensor, coords: Tensor) -> None:
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        where = ", ".join(f"#{i} at {coords[i].tolist()}" for i in bad[:10])
        warnings.warn(
            f"mlifast: the loss is not finite at {len(bad)} point(s): {where}"
            + (" and more" if len(bad) > 10 else "") + "; their values are NaN/inf, the other points are unaffected",
            RuntimeWarning, stacklevel=3,
        )


def _length(data) -> int:
    try:
        return len(data)
    except TypeError:
        return 0


def _versions() -> dict:
    from mlifast import __version__

    return {"mlifast": __version__, "torch": torch.__version__}


# Models whose first-call check found 1-d indices the same for every example (nanoGPT's
# position ids of a length that is a multiple of K·B): the next evaluate call of the same
# model tries that reading first, which saves it a pass of the model at every point (W3 on a
# GPU: two passes a call without it, one with it). A hint only: every call is still checked,
# and the other readings still follow.
_INDICES_SHARED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _indices_found_shared(model: nn.Module) -> bool:
    try:
        return model in _INDICES_SHARED
    except TypeError:  # (a module made unhashable by its own __eq__)
        return False


def _remember_indices_shared(model: nn.Module, shared: bool) -> None:
    try:
        if shared:
            _INDICES_SHARED.add(model)
        else:
            _INDICES_SHARED.discard(model)
    except TypeError:
        pass
