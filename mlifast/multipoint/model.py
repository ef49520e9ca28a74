"""`interpolate()`: any nn.Module → one module that answers for K points of a space."""
from __future__ import annotations

import enum
import warnings
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from itertools import chain, islice
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from mlifast.multipoint.context import PointContext
from mlifast.multipoint.generic import GenericRule
from mlifast.multipoint.layers import BatchNormRule, InPlaceActivation, LinearRule
from mlifast.multipoint.module_copy import copy_module_tree
from mlifast.multipoint.nested_padding import follow_nested_padding
from mlifast.multipoint.pending import PendingInputWritten, _versions, plain
from mlifast.multipoint.point_values import PointValuesRefused
from mlifast.multipoint.reference import PerPointModel, alias_groups, first_disagreement, rounds_float32_to_tf32
from mlifast.multipoint.registry import check_supported, generic_instead, is_parametrized, rule_for
from mlifast.multipoint.shared import SharedRows, SharedRowsWritten
from mlifast.multipoint.trees import map_tensors, tensors_in, unreadable_holders
from mlifast.multipoint.unhandled import UnhandledTensor
from mlifast.ops._checks import transformed
from mlifast.spaces import Span

# Devices whose image batches travel channels-last once a first-call check found that the
# model agrees (MultiPointModel.images_channels_last): the CPU, where it is oneDNN's own
# layout, and CUDA, where cuDNN's TF32 kernels are NHWC and it converted NCHW around them
# (W2 on an H200 1.21× faster channels-last, benchmarks/gpu_candidates.py, BENCHMARKS.md).
CHANNELS_LAST_DEVICES = {"cpu", "cuda"}


class NotPerExampleOutputError(ValueError):
    """The model returned a tensor that does not have one row per example."""


class MultiPointModel(nn.Module):
    """The user's model, answering for every point of `coords` in each call.

    Every tensor argument whose size along `batch_dim` equals the batch size B (that of
    the first tensor argument) is repeated for the K points, folded point-major into
    that dimension; every tensor of the output gains a leading dimension K:
    out[k] == model with space.state_at(coords[k]) loaded, on the same arguments.

    The user's model is never modified; its tensors are not copied (the copy of the
    module tree reads the space's origin tensors).

    The first call of each input shape and number of points is checked against the model
    itself at two of the points (`reference.PerPointModel`); should they disagree — a
    model doing something per batch that mlifast does not follow — the model answers
    from then on one point at a time (correct, K× slower) and says so in a warning.
    """

    def __init__(self, model: nn.Module, space: Span, coords: Any = None, *, batch_dim: int = 0) -> None:
        super().__init__()
        _check_model_matches_space(model, space)
        self.space = space
        self._space_origin = tuple(space.origin.values())  # (in space.keys' order)
        self.batch_dim = batch_dim
        like = next(t for t in space.origin.values() if t.is_floating_point())
        self.context = PointContext(torch.zeros(1, space.num_directions, dtype=like.dtype, device=like.device))
        self.model = _multipoint_copy(model, space, self.context)
        self.norms = tuple(m for m in self.rules() if isinstance(m, BatchNormRule))  # (their statistics)
        # Whether inputs travel as SharedRows: decided by the first-call checks (None:
        # undecided, inputs repeated; see _checked_outputs).
        self.shares_rows: bool | None = None
        # Image batches of a CNN travel channels-last on CHANNELS_LAST_DEVICES (oneDNN's and
        # cuDNN's TF32 kernels' own layout: W2 1.2× faster than NCHW on either) once
        # a first-call check found that the model agrees in that layout (it may not: a
        # `.view` of a 4-d activation, an op reading raw memory). None: undecided, the
        # model's own layout meanwhile.
        modules = list(model.modules())
        has_images = any(isinstance(m, nn.Conv2d) for m in modules)
        self.images_channels_last: bool | None = None if has_images else False
        self._images_converted = False  # (whether the current call converted any)
        # Whether it has convolutions and recurrent layers, which cuDNN may compute in TF32
        # (the first-call check's tolerance).
        self._cudnn_layers = (any(isinstance(m, _ConvNd) for m in modules),
                              any(isinstance(m, nn.RNNBase) for m in modules))
        self.reference = PerPointModel(model, space)
        self.per_point_fallback = False
        # Points run through the model together; None: all. Each call then runs the model
        # once per group (activations of that many points at a time: evaluate picks a
        # cache-sized group on the CPU); rows shared by every point go through the first
        # moving layer's point-independent part once per call (PointContext.reuse).
        self.points_per_group: int | None = None
        self._consume: Callable[[int, Any], None] | None = None  # see outputs_to()
        # Where each output tensor of the last call holds the batch (of one point's output).
        self.output_batch_dims: tuple[int, ...] = ()
        self._checked: set = set()
        self._unchecked = False  # see unchecked()
        self._outputs_read = False  # whether _tell_unreadable looked at them
        # Try 1-d indices the same for every example before reading them as rows (a hint,
        # e.g. from an earlier evaluate call of the same model: it orders the attempts only).
        self.indices_shared_first = False
        self.set_coords(space.coords_tensor(11 if coords is None else coords))

    def set_coords(self, coords: Tensor) -> None:
        """Answer for the points `coords` (K, J) from now on."""
        like = self.context.coeffs
        self.coords = coords
        self.context.coeffs = coords.to(device=like.device, dtype=like.dtype).contiguous()
        self.context.select_points(0, coords.shape[0])

    @property
    def num_points(self) -> int:
        return self.coords.shape[0]

    def rules(self):
        return [m for m in self.model.modules() if hasattr(m, "context") and m is not self]

    def train(self, mode: bool = True) -> "MultiPointModel":
        super().train(mode)
        self.reference.train(mode)
        return self

    @contextmanager
    def outputs_to(self, consume: Callable[[int, Any], None]) -> Iterator[None]:
        """Calls inside hand their outputs to consume(first, outputs) and return None:
        each group's (K_group, …) outputs as soon as the group is computed, `first` the
        index of its first point among the K (all K at once where the call computes them
        so). No (K, …) outputs are put together: a language model's logits over a
        33k-token vocabulary at 700 tokens take 93 MB a point."""
        saved, self._consume = self._consume, consume
        try:
            yield
        finally:
            self._consume = saved

    def forward(self, *args, **kwargs):
        context, saved = self.context, self.context.forward_mode
        # Under forward-mode AD or a torch.func transform every rule takes its pure-PyTorch
        # form: the compiled ops would drop a forward tangent.
        context.forward_mode = saved or transformed(*tensors_in((args, kwargs)))
        versions = _versions(*self._space_origin)
        try:
            out = self._outputs(args, kwargs)
        except Exception as error:  # (an interrupt stays one)
            self._refuse_writes_into_space(versions, error)
            raise
        finally:
            context.forward_mode = saved
        self._refuse_writes_into_space(versions)
        if self._consume is None or out is None:
            return out
        self._consume(0, out)
        return None

    def _refuse_writes_into_space(self, versions: tuple, cause: Exception | None = None) -> None:
        """RuntimeError naming the space's origin tensors whose version counters moved from
        `versions`: the model wrote into its frozen parameters during forward, which the
        copy reads from the space's own tensors (every point after the write would be
        wrong). A write through `.data` moves no counter: not seen."""
        if _versions(*self._space_origin) == versions:
            return
        written = [k for k, t, v in zip(self.space.keys, self._space_origin, versions) if _versions(t) != (v,)]
        raise RuntimeError(
            f"mlifast: the model wrote into {', '.join(map(repr, written[:5]))} during its forward (in place, "
            "e.g. under torch.no_grad()); mlifast evaluates every point from the space's stored tensors, and "
            "that write changed them, so the space no longer holds the points it was made from. Take the "
            "write out of forward (apply it to the checkpoints beforehand if it belongs there) and make "
            "the space again."
        ) from cause

    def _outputs(self, args: tuple, kwargs: dict) -> Any:
        """forward's outputs (K, …), or None where they went to `outputs_to`'s consumer."""
        if self.per_point_fallback:
            self._check_reference_follows_policy()
            return self._from_reference(args, kwargs)
        batch = _batch_size(args, kwargs, self.batch_dim)
        if batch == 0:  # (nothing to compute: each point's empty outputs, of the model's own shapes)
            return self._from_reference(args, kwargs)
        self.context.batch_size, self.context.batch_dim = batch, self.batch_dim
        if self.batch_dim != 0:
            self.shares_rows = False
        if self._unchecked:  # (a probe: no check, and nothing decided)
            return self._run_points(args, kwargs, share_rows=self.shares_rows is True)
        context = self.context
        signature = (self.num_points, context.forward_mode, _call_signature((args, kwargs)))
        if signature not in self._checked:
            # Under forward mode rows are repeated and modules run point by point whatever a
            # reading says: a check there decides nothing for other calls (it has its own signature).
            decisions = (self.shares_rows, self.images_channels_last, context.flat_indices_shared,
                         context.glue_all_at_once)
            try:
                with self._dropout_off() as dropout_was_on:  # (a check compares; dropout decides no reading)
                    problem, computed, out = self._disagreement_with_model(args, kwargs, self._consume,
                                                                           this_call=not dropout_was_on)
            finally:
                if context.forward_mode:
                    (self.shares_rows, self.images_channels_last, context.flat_indices_shared,
                     context.glue_all_at_once) = decisions
            self._checked.add(signature)  # (once decided: an interrupted check is made again)
            if problem is not None:
                warnings.warn(
                    f"mlifast: the multi-point evaluation disagrees with the model itself ({problem}); "
                    "the model does something per batch that mlifast does not follow (for example it "
                    "transposes its batch internally, reads a tensor's size, has a forward hook on a layer, "
                    "or takes an input whose size happens to be the batch's). Falling back to evaluating "
                    f"one point at a time: correct, {self.num_points}× slower. Please report the model.",
                    RuntimeWarning, stacklevel=2)
                self.per_point_fallback = True
                self._check_reference_follows_policy()
                return self._from_reference(args, kwargs)
            if computed:  # the checked run was this call's (its outputs None where they went to the consumer)
                return out
        # Rows are shared only once a check found that sharing agrees with the model.
        return self._run_points(args, kwargs, self.shares_rows is True, self._consume)

    @contextmanager
    def _dropout_off(self) -> Iterator[bool]:
        """Inside, the active dropout of both copies (dropout layers, attentions' dropout) is
        off, so that a check's runs can be compared; yields whether any was on."""
        active = [m for root in (self.model, self.reference.module) for m in root.modules() if m.training and (
            (isinstance(m, _DropoutNd) and m.p > 0) or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0))]
        for m in active:
            m.training = False
        try:
            yield bool(active)
        finally:
            for m in active:
                m.training = True

    @contextmanager
    def unchecked(self, images_channels_last: bool = False, sizes_only: bool = False) -> Iterator[MultiPointModel]:
        """Calls inside run the copied model without the first-call check, on inputs
        repeated for every point unless sharing rows is already known to agree; they mark
        no shape as checked and decide nothing that a check would (chunking's probe of
        activation sizes; a write into a pending result's input still turns deferring off).
        `images_channels_last`: images travel channels-last while that is undecided (the
        forms the passes will most likely take; W2's probe took 45 ms in NCHW, where
        Winograd does not take its convolutions, 30 so). `sizes_only`: see
        PointContext.sizes_only. Generic modules try their forward once for all points
        (PointContext.glue_all_at_once): values are not looked at, and those that refuse do
        so here, on one point, not in the check's K-point calls (a ConvNeXt's four
        LayerNorm2d: four runs of the check's call again, 0.78 → 0.50× the loop)."""
        context = self.context
        saved = (self._unchecked, self.images_channels_last, self._images_converted, context.sizes_only,
                 context.glue_all_at_once)
        self._unchecked, context.sizes_only, context.glue_all_at_once = True, sizes_only, True
        if images_channels_last and self.images_channels_last is None:
            self.images_channels_last = True
        try:
            yield self
        finally:
            (self._unchecked, self.images_channels_last, self._images_converted, context.sizes_only,
             context.glue_all_at_once) = saved

    def _check_reference_follows_policy(self) -> None:
        """The one-point-at-a-time fallback runs the model as it is (batch norm from its
        running statistics) at each point's coordinates as numbers: it cannot stand in for
        per-point batch or recomputed statistics, nor carry derivatives along the
        coordinates (the output path's geometry: they would all be 0)."""
        if transformed(self.context.coeffs):
            raise NotImplementedError(
                "mlifast: this model needs the one-point-at-a-time fallback (see the warning), which cannot "
                "carry derivatives along the coordinates (gauss_length, the output path's curvature); remove "
                "what the warning names from the model, or difference the outputs of mlifast.interpolate at "
                "nearby points instead"
            )
        if self.norms and (self.context.bn_mode != "running" or any(m.recomputed is not None for m in self.norms)):
            raise NotImplementedError(
                "mlifast: this model needs the one-point-at-a-time fallback (see the warning), which "
                "supports only bn='interpolate'; evaluate it with bn='interpolate', or the points one "
                "by one with torch.optim.swa_utils.update_bn"
            )

    def _split(self, out: Any, batch: int) -> Any:
        k, dim, found = self.context.num_active, self.batch_dim, []
        split = map_tensors(lambda t, path: _split_points(t, k, batch, dim, path, found), out, "output")
        self.output_batch_dims = tuple(found)
        if not self._outputs_read:
            self._outputs_read = True
            self._tell_unreadable(out, bool(found))
        return split

    def _tell_unreadable(self, out: Any, readable: bool) -> None:
        """Tensors held in objects out of the tree walk's reach (trees.unreadable_holders)
        cannot be split per point nor checked: refused when they are all the output holds,
        else a warning (looked for in the first outputs only)."""
        holders = unreadable_holders(out, "output")
        if not holders:
            return
        where = ", ".join(holders[:3]) + (" and more" if len(holders) > 3 else "")
        if not readable:
            self._outputs_read = False
            raise TypeError(
                f"mlifast: the model returns its tensors inside {where}, which mlifast cannot read: it "
                "could neither give them a leading K nor check them against the model. Return tensors "
                "in tuples, lists, dicts or dataclasses."
            )
        warnings.warn(
            f"mlifast: tensors inside {where} cannot be read by mlifast. They are returned as computed for "
            "all points at once (their batch is K·B rows, point-major) and are not checked against the model; "
            "the other outputs are. (For a Hugging Face cache, pass use_cache=False.)", RuntimeWarning, stacklevel=4)

    def _from_reference(self, args: tuple, kwargs: dict) -> Any:
        """The reference's outputs (K, …) of every point, `output_batch_dims` read from them:
        `batch_dim` where its size is the batch's, else the first such dimension."""
        out = self.reference(self.coords, args, kwargs)
        batch = _batch_size(args, kwargs, self.batch_dim)
        self.output_batch_dims = tuple(
            self.batch_dim if t.dim() > self.batch_dim + 1 and t.shape[self.batch_dim + 1] == batch
            else next((d for d in range(t.dim() - 1) if t.shape[d + 1] == batch), 0) for t in tensors_in(out))
        return out

    def _disagreement_with_model(self, args: tuple, kwargs: dict, consume: Callable[[int, Any], None] | None,
                                 this_call: bool = True) -> tuple[str | None, bool, Any]:
        """Compare the first and last point against the model itself. Returns the
        disagreement (None if none), whether the checked run computed this call's outputs
        (where they were computed under the call's own batch-norm policy and agree, and
        `this_call`: not with dropout turned off), and those outputs (None where they went
        to `consume`).

        Under per-point batch statistics ("batch", and "collect", which also gathers them)
        the model's batch norms run in train mode, so the check is this call itself.
        Under running statistics the model holds the interpolated ones: recomputed
        statistics are set aside for the check, whose outputs are then not this call's.

        This is also where sharing rows is decided: unless it is known not to agree, the
        points run on shared rows; if that disagrees with the model (a model whose Python
        depends on the batch size: a captured x.shape[0] reshaping a later activation) or
        raises, they run again on repeated inputs against the same reference outputs, and
        if those agree the model repeats its inputs from then on."""
        batch_statistics = self.context.bn_mode in ("batch", "collect")
        set_aside = not batch_statistics and any(m.recomputed is not None for m in self.norms)
        if this_call and not set_aside:
            with self.reference.batch_statistics(batch_statistics):
                problem, out = self._checked_outputs(args, kwargs, consume)
            return problem, problem is None, out
        saved = [m.recomputed for m in self.norms]
        if set_aside:
            for m in self.norms:
                m.recomputed = None
        undo = self._statistics_undo()  # (the call itself gathers them)
        try:
            with self.reference.batch_statistics(batch_statistics):
                problem, _ = self._checked_outputs(args, kwargs, consume, only_checked=True)
        finally:
            undo()
            for m, stats in zip(self.norms, saved):
                m.recomputed = stats
        return problem, False, None

    def _checked_outputs(self, args: tuple, kwargs: dict, consume: Callable[[int, Any], None] | None,
                         only_checked: bool = False) -> tuple[str | None, Any]:
        """(disagreement or None, outputs): the points run under the most efficient reading
        of the inputs, compared at the first and last point with the model itself (whose
        outputs are computed once: one reused state, `PerPointModel.reusing_state`); on a
        disagreement, or an exception, under the next reading (`_readings`), until one
        agrees. The one that agrees is kept for later calls; None agreeing, the last
        disagreement is returned. Where every reading raised: the model's own exception
        where it raises on these inputs too, mlifast's where it refuses something, else
        that as the disagreement (the model then answers one point at a time).

        In groups, the groups holding the two points run first, and nothing goes to
        `consume` before they agree: the others then run and go to it (the outputs
        returned are None), or are put together (K, …) without `consume`; with
        `only_checked`, they do not run (the outputs are not this call's)."""
        expected: dict[int, Any] = {}
        checked, group = sorted({0, self.num_points - 1}), self._group_size()
        tf32 = rounds_float32_to_tf32(*self._cudnn_layers)

        def disagreement(held: dict[int, Any]) -> str | None:
            for k in checked:
                if k not in expected:
                    expected[k] = self.reference.at(self.coords[k], args, kwargs)
                problem = first_disagreement(held[k // group * group], expected[k], k % group, tf32)
                if problem is not None:
                    return f"at point #{k}, coordinates {self.coords[k].tolist()}: {problem}"
            return None

        undo, context = self._statistics_undo(), self.context
        problem, error, flat_start, agreed = None, None, self.context.flat_indices_shared, None
        with self.reference.reusing_state():
            for share in self._readings():
                context.flat_indices_fit_rows = self._images_converted = False
                groups = self._groups(args, kwargs, share, first=checked)
                try:  # (the groups holding the checked points come first)
                    held = dict(islice(groups, len(self._groups_holding(checked))))
                except Exception as e:  # noqa: BLE001 — the next reading may not raise
                    groups.close()
                    problem, error = "raised", e
                    undo()
                    continue
                try:
                    problem, error = disagreement(held), None
                except BaseException:  # (the model itself raised, or an interrupt: the groups' state dropped)
                    groups.close()
                    raise
                if problem is None:
                    if share and self.shares_rows is None and self.num_points > 1:
                        self.shares_rows = True  # (one point cannot tell: the same rows either way)
                    elif not share and self.batch_dim == 0:
                        self.shares_rows = False  # shared rows disagree or fail: repeat inputs from now on
                    if context.flat_indices_shared and not flat_start and not context.flat_indices_fit_rows:
                        context.flat_indices_shared = False  # (no 1-d indices fit the rows: nothing decided)
                    agreed = groups, held
                    break
                groups.close()
                del held
                undo()
        if agreed is not None:  # (the reference's state and outputs dropped before the other groups run)
            expected.clear()
            groups, held = agreed
            with closing(groups):
                if only_checked:
                    return None, None
                return None, self._delivered(chain(((s, held.pop(s)) for s in list(held)), groups), consume)
        if error is not None:
            own = None if 0 in expected else self._own_error(args, kwargs)  # (it ran at point 0: no)
            if own is not None:
                raise own from None  # (the model's own message, as running it alone gives)
            if str(error).startswith("mlifast:") or _out_of_memory(error):  # (mlifast's own refusal, or no room)
                raise error
            return f"it raised {type(error).__name__} ({error}) where the model itself runs", None
        return problem, None

    def _own_error(self, args: tuple, kwargs: dict) -> Exception | None:
        """The exception the model itself raises on these inputs (at the first point), or
        None: where every reading raised, an input the model cannot take (an image too
        small for its strides) gives the model's own message, not one from inside a rule."""
        try:
            self.reference.at(self.coords[0], args, kwargs)
        except Exception as own:  # noqa: BLE001 — handed to the caller
            return own
        return None

    def _readings(self) -> Iterator[bool]:
        """The ways to read the inputs, most efficient first, each tried only where the
        previous attempt showed it could matter: rows shared by every point (SharedRows),
        then inputs repeated for each point; within each, 1-d embedding indices as rows,
        then the same for every example (PointContext.flat_indices_shared; the other way
        round with `indices_shared_first`, and only the latter once a check found it);
        within each, images channels-last, then in the model's own layout; within each,
        generic modules once for all points, then point by point
        (PointContext.glue_all_at_once). Sets the flags for the next attempt and yields
        whether it shares rows.

        Indices shared come before inputs repeated: indices read as rows are a guess from
        a length that is a multiple of K·B (nanoGPT's position ids), the likelier culprit
        of a disagreement than a model that depends on its batch size."""
        context, flat_start = self.context, self.context.flat_indices_shared
        images_start, seen_flat = self.images_channels_last is not False, False
        flats = (True,) if flat_start else (True, False) if self.indices_shared_first else (False, True)
        for share in (True, False):
            if share and (self.batch_dim != 0 or self.shares_rows is False):
                continue
            for flat in flats:
                if flats == (False, True) and flat and not seen_flat:
                    break  # (no indices were read as rows: sharing them is the same again)
                context.flat_indices_shared = flat
                for images in (True, False) if images_start else (False,):
                    if not images and images_start and not self._images_converted:
                        break  # (no image went channels-last: the same again)
                    self.images_channels_last = images
                    for glue in (True, False):
                        if not glue and not any(isinstance(m, GenericRule) and m.all_at_once for m in self.rules()):
                            break  # (no module ran its own tensors for all points: the same again)
                        context.glue_all_at_once = glue
                        yield share
                        seen_flat = seen_flat or context.flat_indices_fit_rows

    def _run_points(self, args: tuple, kwargs: dict, share_rows: bool,
                    consume: Callable[[int, Any], None] | None = None) -> Any:
        """Outputs (K, …) for every point: the copied model run on all points at once, or
        on `points_per_group` at a time with what is shared by every point kept between
        the groups (PointContext.reuse). With `consume`, each group's outputs go to it
        (see outputs_to) and the call returns None."""
        with closing(self._groups(args, kwargs, share_rows)) as groups:
            return self._delivered(groups, consume)

    def _delivered(self, groups: Iterable[tuple[int, Any]], consume: Callable[[int, Any], None] | None) -> Any:
        """Each group's outputs to `consume` (then None), or put together (K, …)."""
        out, k = None, self.num_points
        one_group = self._group_size() >= k
        for start, part in groups:
            if consume is not None:
                consume(start, part)
            elif one_group:
                return part
            else:
                # Outputs for all K points, allocated once, each group's copied in and freed
                # with its activations. Kept until the end instead, each group's small outputs
                # sat between the next groups' large transient activations and fragmented
                # glibc's heap (W5, 441 points: peak 500–880 MB in a third of the runs, else 60).
                if out is None:
                    out = map_tensors(lambda t, _path: t.new_empty((k, *t.shape[1:])), part)
                for whole, piece in zip(tensors_in(out), tensors_in(part)):
                    whole[start : start + piece.shape[0]].copy_(piece)
            del part
        return out

    def _group_size(self) -> int:
        """Points a run computes at once (`points_per_group`, at most all K)."""
        return max(1, min(self.points_per_group or self.num_points, self.num_points))

    def _groups_holding(self, points: Iterable[int]) -> list[int]:
        """The first points of the groups holding `points`, in their order."""
        group = self._group_size()
        return list(dict.fromkeys(p // group * group for p in points))

    def _groups(self, args: tuple, kwargs: dict, share_rows: bool, first: Iterable[int] = ()) -> Iterator[tuple[int, Any]]:
        """(index of the group's first point, its outputs (K', …)) for each group of
        `points_per_group` points (one of all K where that is None), the groups holding the
        points `first` before the others, in order. Close it (contextlib.closing) where it
        is not run to its end: the groups' shared state is dropped then."""
        context, batch = self.context, self.context.batch_size
        k, group = self.num_points, self._group_size()
        if group >= k:
            yield 0, self._split(self._run(args, kwargs, share_rows), batch)
            return
        leading = self._groups_holding(first)
        everyone = context.active_span
        inputs = self._copy_inputs(args, kwargs) if share_rows else (args, kwargs)
        versions = _versions(*tensors_in(inputs))
        context.grouped = True
        try:
            for start in leading + [s for s in range(0, k, group) if s not in leading]:
                if share_rows and _versions(*tensors_in(inputs)) != versions:  # (an activation with inplace=True on them)
                    inputs = self._copy_inputs(args, kwargs)
                    versions = _versions(*tensors_in(inputs))
                context.select_points(everyone[0] + start, everyone[0] + min(start + group, k))
                part = self._split(self._run(*inputs, share_rows, copied=True), batch)
                yield start, part
                del part
                share_rows = share_rows and self.shares_rows is not False  # (the model wrote into its inputs)
        finally:
            context.select_points(*everyone)
            context.grouped = False
            context.forget()

    def _copy_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The batch-carrying tensors copied once for all groups of a call."""
        batch, dim = self.context.batch_size, self.batch_dim
        copy_batch = lambda t, _path: self._copy(t) if _carries_batch(t, batch, dim) else t  # noqa: E731
        return map_tensors(copy_batch, args, "args"), map_tensors(copy_batch, kwargs, "kwargs")

    def _layout(self, t: Tensor) -> torch.memory_format:
        """The layout an input tensor carrying the batch travels in: channels-last for
        float32 and bfloat16 images on CHANNELS_LAST_DEVICES where `images_channels_last`
        says so, else contiguous."""
        if (self.images_channels_last is True and t.dim() == 4 and t.device.type in CHANNELS_LAST_DEVICES
                and t.dtype in (torch.float32, torch.bfloat16)):
            self._images_converted = True
            return torch.channels_last
        return torch.contiguous_format

    def _copy(self, t: Tensor) -> Tensor:
        return t.clone(memory_format=self._layout(t))

    def _statistics_undo(self) -> Callable[[], None]:
        """Undoes what the batch norms gather for "recompute" from now on: for a run that is
        abandoned and run again (it would otherwise count twice)."""
        if self.context.bn_mode != "collect":
            return lambda: None
        kept = [(m, m.gathered()) for m in self.norms]
        return lambda: [m.set_gathered(sums) for m, sums in kept]

    def _run(self, args: tuple, kwargs: dict, share_rows: bool, copied: bool = False):
        """The copied model for the active points on the inputs repeated for each of them
        (or, with share_rows, on SharedRows of B rows); outputs (…, K_active·B, …).
        `copied`: the inputs are already a copy the model may write into."""
        k, batch, dim = self.context.num_active, self.context.batch_size, self.batch_dim

        def lift(t: Tensor, _path: str) -> Tensor:
            if not _carries_batch(t, batch, dim):
                return t
            # A copy either way: in-place operations of the model never reach the caller's tensor.
            # (SharedRows is a new leaf: an input that needs gradients, or carries a forward
            # tangent, is repeated instead.)
            if share_rows and not (t.requires_grad and torch.is_grad_enabled()) and not self.context.forward_mode:
                return SharedRows(t if copied else self._copy(t), k, self.context)
            if k == 1:
                return self._copy(t)
            return _repeat_points(t, k, dim).contiguous(memory_format=self._layout(t))

        undo = self._statistics_undo()
        try:
            out = self.model(*map_tensors(lift, args, "args"), **map_tensors(lift, kwargs, "kwargs"))
            # (a pending output reads its inputs here, where a write into them runs the call again)
            return map_tensors(plain, out, "output")
        except SharedRowsWritten:
            if not share_rows:
                raise
            undo()
            self.shares_rows = False  # the model writes into its inputs: repeat them from now on
            return self._run(args, kwargs, share_rows=False, copied=copied)
        except PendingInputWritten:
            undo()
            self.context.defer_pending = False  # (it writes into activations a pending result read)
            return self._run(args, kwargs, share_rows, copied=copied)
        except PointValuesRefused:  # (the module that refused runs point by point from now on)
            undo()
            return self._run(args, kwargs, share_rows, copied=copied)


def interpolate(model: nn.Module, space: Span, coords: Any, *, batch_dim: int = 0) -> MultiPointModel:
    """A module answering for every point `coords` of `space` at once (see MultiPointModel).

    Args:
        model: any nn.Module whose state_dict matches the space's keys.
        space: a Line, Plane or Span (on the device and in the dtype to compute in).
        coords: (K,) for a Line, (K, J) in general, or an int for evenly spaced points.
        batch_dim: the dimension of the inputs and outputs holding the batch.
    """
    return MultiPointModel(model, space, coords, batch_dim=batch_dim)


def _check_model_matches_space(model: nn.Module, space: Span) -> None:
    state = model.state_dict()  # (once; no keep_vars: a model may define state_dict without it)
    origin = space.origin
    keys = set(state)
    missing, unexpected = sorted(set(space.keys) - keys), sorted(keys - set(space.keys))
    if missing or unexpected:
        raise ValueError(
            "mlifast: the model's state_dict does not match the space: "
            + (f"keys only in the space: {missing[:10]}; " if missing else "")
            + (f"keys only in the model: {unexpected[:10]}; " if unexpected else "")
            + "build the space from checkpoints of this model class"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(origin[name].shape):
            raise ValueError(
                f"mlifast: '{name}' has shape {tuple(tensor.shape)} in the model but "
                f"{tuple(origin[name].shape)} in the space"
            )
    for key, first in alias_groups(model).items():
        if key != first and not _same_in_space(space, key, first):
            raise ValueError(
                f"mlifast: '{key}' and '{first}' are one tied tensor in the model but differ in the "
                "space; give both keys the same values in every state dict"
            )


def _same_in_space(space: Span, a: str, b: str) -> bool:
    if not torch.equal(space.origin[a], space.origin[b]):
        return False
    if not space.origin[a].is_floating_point():
        return True
    return torch.equal(space.direction(a), space.direction(b))


def _multipoint_copy(model: nn.Module, space: Span, context: PointContext) -> nn.Module:
    """A copy of the module tree whose tensors are the space's origin (moving ones as
    UnhandledTensors), with every module owning moving tensors replaced by its rule."""
    memo: dict[int, Any] = {}
    space_origin = space.origin
    originals = dict(model.named_modules(remove_duplicate=False))
    owners = _owners(originals)
    owned: dict[str, dict[str, tuple[str, Tensor]]] = {}  # owner's path → name in it → (key, origin)
    for path, module in originals.items():
        own = list(module._parameters.items()) + [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set
        ]
        owner, within = owners.get(path, (path, ""))
        for name, tensor in own:
            if tensor is None:
                continue
            key = f"{path}.{name}" if path else name
            origin = space_origin[key]
            moving = origin.is_floating_point() and not space.is_frozen(key)
            if id(tensor) not in memo:
                if moving:
                    memo[id(tensor)] = UnhandledTensor(origin, key, type(module).__name__)
                else:  # buffers may be updated in place (train-mode batch norm): never the space's
                    memo[id(tensor)] = origin.clone() if name in module._buffers else origin
            owned.setdefault(owner, {})[within + name] = (key, origin)
    clone = top = copy_module_tree(model, memo)
    copied = dict(clone.named_modules(remove_duplicate=False))  # before any replacement
    for path, module in copied.items():
        if path in owners:  # (another module's rule answers for its tensors: _owners)
            continue
        tensors = owned.get(path, {})
        moving = {n: k for n, (k, o) in tensors.items() if o.is_floating_point() and not space.is_frozen(k)}
        check_supported(module, path)
        # Batch norm mixes the rows of a batch: always per point, even when frozen. An
        # attention's forward reads its out_proj's tensors itself: its rule answers when they move.
        if not (moving or isinstance(module, _BatchNorm) or _out_projection_moves(module, path, space)):
            continue
        rule = rule_for(module)(
            module, path,
            origins={n: o for n, (k, o) in tensors.items() if o.is_floating_point()},
            directions={n: space.direction(k) for n, k in moving.items()},
            context=context,
        )
        if path:
            parent_path, _, child = path.rpartition(".")
            copied[parent_path]._modules[child] = rule
        else:
            top = rule
    follow_nested_padding(copied, originals)
    fuse_activations(top)
    return top


def _out_projection_moves(module: nn.Module, path: str, space: Span) -> bool:
    """Whether `module` is a MultiheadAttention whose out_proj has a moving tensor."""
    if not isinstance(module, nn.MultiheadAttention):
        return False
    prefix = f"{path}.out_proj." if path else "out_proj."
    return any(p is not None and not space.is_frozen(prefix + name) for name, p in module.out_proj._parameters.items())


def _owners(modules: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Path of each module whose tensors another module's rule answers for → (that
    module's path, the prefix of the tensors' names there): a parametrized module's rule
    owns its parametrizations' tensors (its forward computes its weight from each point's),
    and a module of a fused class that takes the generic rule (`registry.generic_instead`)
    its whole subtree (MultiheadAttention reads its out_proj's weight itself). The
    outermost owner wins."""
    owners: dict[str, tuple[str, str]] = {}
    for root, module in modules.items():
        if not (module._parameters or "parametrizations" in module._modules):
            continue  # (neither: the common case, at a glance)
        if generic_instead(module):
            within = root
        elif is_parametrized(module):
            within = f"{root}.parametrizations" if root else "parametrizations"
        else:
            continue
        for path in modules:
            inside = path.startswith(within + ".") if within else path != ""
            if path != root and (path == within or inside):
                owners.setdefault(path, (root, path[len(root) + 1 if root else 0:] + "."))
    return owners


def fuse_activations(root: nn.Module) -> None:
    """In every nn.Sequential of the copy, an activation (ReLU, Tanh, Sigmoid) that
    directly follows a rule with a fresh output works on that output: in a Sequential
    nothing else sees the rule's output. A ReLU after a linear rule joins its op
    (`LinearRule.relu`: max(y, 0) in the op's own pass over its output; each place a
    module appears in the model has its own rule, see _multipoint_copy); any other works
    in place (InPlaceActivation). Modules with hooks are left as they are."""
    for seq in list(root.modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for before, name in zip(names, names[1:]):
            rule, act = seq._modules[before], seq._modules[name]
            if (not getattr(rule, "fresh_output", False) or type(act) not in InPlaceActivation.IN_PLACE
                    or act._forward_hooks or act._forward_pre_hooks):
                continue
            if type(act) is nn.ReLU and isinstance(rule, LinearRule):
                rule.relu = True
                seq._modules[name] = nn.Identity()
            else:
                seq._modules[name] = InPlaceActivation(act)


def _call_signature(tree: Any) -> Any:
    """What the first-call check is made once for: the arguments' structure with each
    tensor's shape and dtype and each flag (bool, None, str, enum member) itself — a flag
    may choose a path that depends on the batch. Other values count by their type only:
    numbers and objects may change every batch (a step, sequence lengths)."""
    if isinstance(tree, Tensor):
        return tuple(tree.shape), tree.dtype
    if isinstance(tree, (tuple, list)):
        return type(tree), tuple(_call_signature(v) for v in tree)
    if isinstance(tree, dict):
        return type(tree), tuple((key, _call_signature(v)) for key, v in tree.items())
    if tree is None or isinstance(tree, (bool, str, enum.Enum)):
        return type(tree), tree
    return type(tree)


def _out_of_memory(error: Exception) -> bool:
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, (MemoryError, out_of_memory)) or "can't allocate memory" in str(error)


def _batch_size(args: tuple, kwargs: dict, dim: int) -> int:
    for t in tensors_in((args, kwargs)):
        if t.dim() > dim:
            return t.shape[dim]
    raise ValueError(f"mlifast: found no tensor argument with a batch dimension {dim} to fold the points into")


def _carries_batch(t: Tensor, batch: int, dim: int) -> bool:
    return t.dim() > dim and t.shape[dim] == batch


def _repeat_points(t: Tensor, k: int, dim: int) -> Tensor:
    """(…, B, …) → (…, K·B, …) point-major, B at `dim`."""
    shape = list(t.shape)
    shape.insert(dim, k)
    return t.unsqueeze(dim).expand(shape).flatten(dim, dim + 1)


def _split_points(t: Tensor, k: int, batch: int, dim: int, path: str, found: list) -> Tensor:
    """(…, K·B·m, …) → (K, …, B·m, …): at `dim`, or else at the first dim whose size is a
    multiple of K·B (e.g. attention weights, batch-first, of a sequence-first model), a guess
    the first-call check tells right or wrong (with dropout turned off for it), appended to
    `found`."""
    fits = [d for d in range(t.dim()) if t.shape[d] > 0 and t.shape[d] % (k * batch) == 0]
    if dim not in fits:
        if not fits:
            raise NotPerExampleOutputError(
                f"mlifast: {path} has shape {tuple(t.shape)}, which is not one row per example "
                f"along dim {dim} for {k} points × {batch} examples: it mixes the rows of all points "
                "(for example a loss computed inside forward, as Hugging Face models do when given "
                "labels=). Return per-example outputs and compute the loss outside (mlifast.evaluate does). "
                f"(The {batch} examples are the size of the first tensor argument along dim {dim}; where that "
                "tensor is not batched so, as EmbeddingBag's flat indices with offsets, pass a batched one first.)"
            )
        dim = fits[0]
    found.append(dim)
    return t.unflatten(dim, (k, t.shape[dim] // k)).movedim(dim, 0)
