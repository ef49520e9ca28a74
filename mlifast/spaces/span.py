"""Affine subspaces of weight space: :class:`Span`, :class:`Line`, :class:`Plane`.

A point of a J-dimensional span is named by coordinates ``c`` (J float64 numbers) and is the
state dict

    θ(c) = origin + Σ_j c_j · d_j

for every floating-point entry (parameters and floating buffers such as batch-norm running
statistics). Non-floating entries (``num_batches_tracked``) are the origin's at every point.

All tensors are detached copies taken at construction, so the source model may keep
training. A span is immutable: treat the tensors returned by ``origin`` and ``direction``
as read-only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from mlifast._messages import list_names
from mlifast.ops._checks import transformed

StateLike = Union[nn.Module, Mapping[str, Tensor]]
"""An ``nn.Module`` (its ``state_dict()`` is used) or a mapping of names to tensors."""

_MAX_NAMES = 10
_SPAN_FIX = (
    "A direction needs a tensor of the origin's shape, dtype and device for every "
    "floating-point entry of the origin (use torch.zeros_like(origin[name]) for an entry "
    "that must not move, e.g. batch-norm running statistics)."
)
_ENDPOINT_FIX = (
    "All points must be state dicts of the same architecture (e.g. checkpoints of one "
    "model class); a 'module.' prefix left by DataParallel or a renamed layer is a common "
    "cause."
)


# ----------------------------------------------------------------------------- helpers


def _names(keys: Iterable[Any], limit: int = _MAX_NAMES) -> str:
    return list_names(keys, limit)


def _is_floating(t: Tensor) -> bool:
    return t.is_floating_point()


def read_state(obj: StateLike, role: str) -> dict[str, Tensor]:
    """Detached (not yet cloned) view of ``obj``'s entries, in its own key order.

    Raises TypeError unless ``obj`` is a Module or a Mapping of str to Tensor.
    """
    if isinstance(obj, nn.Module):
        state: Mapping[Any, Any] = obj.state_dict()
    elif isinstance(obj, Mapping):
        state = obj
    else:
        raise TypeError(
            f"{role} must be an nn.Module or a state dict (a mapping of names to tensors), "
            f"got {type(obj).__name__}."
        )
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"{role}: keys must be strings; got {_names(bad_keys)}.")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        kinds = sorted({type(state[k]).__name__ for k in bad})
        raise TypeError(
            f"{role}: entries {_names(bad)} are not tensors ({', '.join(kinds)}); "
            "pass a state dict whose values are all tensors."
        )
    return {k: v.detach() for k, v in state.items()}


def _check_origin(origin: dict[str, Tensor], role: str) -> None:
    """The origin must have floating entries and no complex ones (its values are checked
    with its directions, `_check_origin_finite`)."""
    if not origin:
        raise ValueError(f"{role} has no entries; pass a model or a non-empty state dict.")
    complex_keys = [k for k, t in origin.items() if t.is_complex()]
    if complex_keys:
        raise ValueError(
            f"{role}: complex tensors are not supported: {_names(complex_keys)}."
        )
    if not any(_is_floating(t) for t in origin.values()):
        raise ValueError(
            f"{role} has no floating-point entries, so every point of the space would be "
            "the same; pass a model with floating-point parameters."
        )


_CONSTANT_ONLY = ("A space may hold NaN or ±inf only where every point has the same value (an "
                  "attention mask's −inf); repair or drop the checkpoint.")


def _check_finite(
    state: Mapping[str, Tensor], role: str, origin: Mapping[str, Tensor], why: str = "",
    same_as: Mapping[str, Tensor] | None = None,
) -> None:
    """ValueError naming the floating entries of ``state`` (among ``origin``'s keys) that
    hold NaN or ±inf, except where they equal ``same_as``'s (an endpoint's −inf where the
    other endpoint has it too)."""
    def finite(k: str, t: Tensor) -> bool:
        ok = torch.isfinite(t)
        return bool(ok.all()) or (same_as is not None and bool((ok | (t == same_as[k])).all()))

    bad = [k for k, t in state.items() if k in origin and _is_floating(origin[k]) and _is_floating(t)
           and not finite(k, t)]
    if bad:
        raise ValueError(f"{role} has non-finite values (NaN or inf) in {_names(bad)}{why}. {_CONSTANT_ONLY}")


def _check_origin_finite(origin: Mapping[str, Tensor], directions: Mapping[str, Sequence[Tensor]],
                         role: str) -> None:
    """ValueError naming the origin's entries with NaN or ±inf where a direction is not 0
    (those points would differ there)."""
    def moves_non_finite(k: str) -> bool:
        fixed = torch.isfinite(origin[k]).logical_not_()
        return bool(fixed.any()) and any(bool((d != 0)[fixed].any()) for d in directions[k])

    bad = [k for k in directions if moves_non_finite(k)]
    if bad:
        raise ValueError(f"{role} has non-finite values (NaN or inf) in {_names(bad)} where the points "
                         f"differ. {_CONSTANT_ONLY}")


def _difference(other: Tensor, base: Tensor) -> Tensor:
    """other − base, computed in their dtype; 0 where both hold the same infinity."""
    d = other - base
    return d if bool(torch.isfinite(base).all()) else torch.where(other == base, 0, d)


def _check_against(
    origin: Mapping[str, Tensor], other: Mapping[str, Tensor],
    origin_role: str, other_role: str, fix: str,
) -> None:
    """ValueError listing every way ``other`` fails to match ``origin``'s floating entries:
    missing keys, unexpected floating keys, and shape / dtype / device mismatches (an
    entry floating on one side only is a dtype mismatch). Entries non-floating on both
    sides are not compared (they always come from the origin)."""
    floating = [k for k, t in origin.items() if _is_floating(t)]
    missing = [k for k in floating if k not in other]
    unexpected = [k for k, t in other.items() if k not in origin and _is_floating(t)]
    # (floating in `other` only: it would silently keep the origin's value at every point)
    common = [k for k, t in origin.items() if k in other and (_is_floating(t) or _is_floating(other[k]))]

    def pairs(attr: str, fmt: Any = str) -> list[str]:
        return [
            f"{k!r} ({origin_role} {fmt(getattr(origin[k], attr))}, "
            f"{other_role} {fmt(getattr(other[k], attr))})"
            for k in common
            if getattr(origin[k], attr) != getattr(other[k], attr)
        ]

    def listing(items: list[str]) -> str:
        text = "; ".join(items[:_MAX_NAMES])
        return text + (f" and {len(items) - _MAX_NAMES} more" if len(items) > _MAX_NAMES else "")

    problems = []
    if missing:
        problems.append(
            f"{len(missing)} floating-point entries of {origin_role} are missing from "
            f"{other_role}: {_names(missing)}"
        )
    if unexpected:
        problems.append(
            f"{other_role} has {len(unexpected)} floating-point entries that {origin_role} "
            f"lacks: {_names(unexpected)}"
        )
    shapes = pairs("shape", lambda s: tuple(s))
    if shapes:
        problems.append(f"shape mismatch: {listing(shapes)}")
    dtypes = pairs("dtype")
    if dtypes:
        problems.append(
            f"dtype mismatch: {listing(dtypes)} — cast both to one dtype first, "
            "e.g. model.to(torch.float32)"
        )
    devices = pairs("device")
    if devices:
        problems.append(
            f"device mismatch: {listing(devices)} — move both to one device first, "
            "e.g. model.to('cpu')"
        )
    if problems:
        raise ValueError(
            f"{other_role} does not match {origin_role}:\n  - "
            + "\n  - ".join(problems) + f"\n{fix}"
        )


def _distinct_memory(a: Tensor, b: Tensor) -> bool:
    """Whether a and b surely start at different memory (False where that cannot be read,
    e.g. tensors of a torch.func transform)."""
    try:
        return a.data_ptr() != b.data_ptr()
    except RuntimeError:
        return False


def _describe_source(obj: StateLike) -> str:
    if isinstance(obj, nn.Module):
        return f"module {type(obj).__name__}"
    return "state_dict"


# ----------------------------------------------------------------------------- Span


class Span:
    """The affine subspace θ(c) = origin + Σ_j c_j · d_j of weight space, J ≥ 1.

    Args:
        origin: the point c = 0 — an ``nn.Module`` or a state dict.
        directions: non-empty sequence of J state dicts (or modules); each holds, for every
            floating-point entry of ``origin``, a tensor of the same shape, dtype and device.
            Non-floating entries in a direction are ignored.

    Raises:
        TypeError: an argument is neither a Module nor a mapping of names to tensors.
        ValueError: missing / unexpected keys, shape / dtype / device mismatches, or
            non-finite values; the message names the offending keys.
    """

    kind = "span"
    _direction_norms: list[float] | None = None  # describe()'s, computed once

    def __init__(self, origin: StateLike, directions: Iterable[StateLike]) -> None:
        if isinstance(directions, (Mapping, nn.Module, Tensor, str)) or not isinstance(
            directions, Iterable
        ):
            raise TypeError(
                "directions must be a sequence of state dicts (e.g. [d1, d2]); "
                f"got {type(directions).__name__}. For a single direction pass [d]."
            )
        directions = list(directions)
        if not directions:
            raise ValueError("directions is empty; a Span needs at least one direction.")
        self._init_checked(origin, [(f"directions[{j}]", d) for j, d in enumerate(directions)],
                           {"method": "Span(origin, directions)", "origin": _describe_source(origin)})

    # -- construction -------------------------------------------------------------

    def _init_checked(self, origin: StateLike, directions: list[tuple[str, StateLike]], built: dict[str, Any]) -> None:
        """`_init_parts` from an origin and (role, direction) pairs read and validated."""
        o = read_state(origin, "origin")
        _check_origin(o, "origin")
        dirs = []
        for role, d in directions:
            state = read_state(d, role)
            _check_against(o, state, "origin", role, _SPAN_FIX)
            _check_finite(state, role, o)
            dirs.append(state)
        stacked = {k: [d[k] for d in dirs] for k, t in o.items() if _is_floating(t)}
        _check_origin_finite(o, stacked, "origin")
        self._init_parts(o, stacked, built)

    def _init_parts(
        self, origin: Mapping[str, Tensor], directions: Mapping[str, list[Tensor]],
        built: dict[str, Any],
    ) -> None:
        """Store a clone of ``origin`` and, per floating key, the J direction tensors
        stacked into one (J, *shape) tensor. Inputs are assumed validated."""
        self._origin = {k: t.detach().clone() for k, t in origin.items()}
        self._directions = {k: torch.stack([d.detach() for d in ds]) for k, ds in directions.items()}
        self._built = built
        self._refresh()

    def _refresh(self) -> None:
        """What is derived from the directions' values, after they are set or cast."""
        self._frozen = {k: not bool(d.any()) for k, d in self._directions.items()}
        self._direction_norms = None  # describe()'s, recomputed on its next call
        self.__dict__.pop("_rows", None)  # (_direction_rows' views of the old directions)

    # -- read-only views ----------------------------------------------------------

    @property
    def origin(self) -> dict[str, Tensor]:
        """name -> tensor at c = 0 (every entry, origin dtype/device). Read-only."""
        return dict(self._origin)

    @property
    def num_directions(self) -> int:
        """J, the dimension of the span."""
        return next(iter(self._directions.values())).shape[0]

    @property
    def keys(self) -> tuple[str, ...]:
        """Every entry name, in the origin's order."""
        return tuple(self._origin)

    @property
    def floating_keys(self) -> tuple[str, ...]:
        """Names of the floating-point entries (those that move), in the origin's order."""
        return tuple(self._directions)

    def direction(self, name: str) -> Tensor:
        """The J directions of entry ``name`` stacked: shape (J, *origin[name].shape),
        origin dtype/device. Read-only. KeyError for unknown or non-floating entries."""
        if name not in self._directions:
            what = "is not floating-point (it is constant)" if name in self._origin else "is unknown"
            raise KeyError(f"{name!r} {what}; directions exist only for floating-point entries.")
        return self._directions[name]

    def is_frozen(self, name: str) -> bool:
        """True when entry ``name`` is the same at every point: every direction is exactly
        zero there (e.g. a frozen layer), or the entry is non-floating. KeyError if unknown."""
        if name in self._frozen:
            return self._frozen[name]
        if name in self._origin:
            return True
        raise KeyError(f"{name!r} is not an entry of this {self.kind}.")

    # -- points -------------------------------------------------------------------

    def _coord_list(self, coord: Any) -> list[float]:
        J = self.num_directions
        # Python floats (as the reference forms each layer's weights): checked without a tensor.
        if type(coord) in (list, tuple) and len(coord) == J and all(type(v) is float for v in coord):
            if not all(math.isfinite(v) for v in coord):
                raise ValueError(f"coordinate {list(coord)} is not finite.")
            return list(coord)
        try:
            t = torch.as_tensor(coord, dtype=torch.float64).detach().cpu()
        except OverflowError:
            raise ValueError(f"coordinate {coord!r} is beyond float64's range.") from None
        if t.dim() == 0 and J == 1:
            t = t.reshape(1)
        if t.dim() != 1 or t.numel() != J:
            expected = "a float (or a length-1 sequence)" if J == 1 else f"a sequence of {J} floats"
            raise ValueError(
                f"state_at expects {expected} for this {self.kind} (J={J}); "
                f"got shape {tuple(t.shape)}."
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"coordinate {t.tolist()} is not finite.")
        return t.tolist()

    def state_at(self, coord: Any, out: Mapping[str, Tensor] | None = None,
                 keys: Iterable[str] | None = None) -> dict[str, Tensor]:
        """The full state dict at one point (or the entries `keys` of it).

        Args:
            coord: a float (J = 1), or a sequence / 1-D tensor / array of J floats.
            out: optionally, a state dict returned by an earlier ``state_at`` of this span,
                whose tensors are overwritten with this point's values instead of
                allocating new ones (an entry that does not match is allocated anew).
            keys: only these entries (default: all); KeyError naming an unknown one.
        Returns:
            A new dict in the origin's key order (that of `keys` if given): origin[k] +
            Σ_j c_j · d_j[k] for floating entries (computed in the entry's dtype, directions
            added one at a time), a copy of origin[k] for the others. Same dtypes and
            devices as the origin.
        """
        c = self._coord_list(coord)
        rows = self._direction_rows()
        entries = self._origin
        if keys is not None:
            keys = list(keys)
            unknown = [k for k in keys if k not in entries]
            if unknown:
                raise KeyError(f"not entries of this {self.kind}: {_names(unknown)}")
            entries = {k: entries[k] for k in keys}
        fresh = self._fresh_floating(c, rows, entries) if out is None else {}
        result = {}
        for k, o in entries.items():
            if k in fresh:
                result[k] = fresh[k]
                continue
            t = None if out is None else out.get(k)
            if not (isinstance(t, Tensor) and t.shape == o.shape and t.dtype == o.dtype and t.device == o.device
                    and t.stride() == o.stride() and _distinct_memory(t, o)):
                t = torch.empty_like(o, memory_format=torch.preserve_format)
            d = rows.get(k)
            if d is None:
                t.copy_(o)
            else:  # origin + c_0·d_0 in one pass over memory, as o.clone().add_(d_0, alpha=c_0) computes it
                torch.add(o, d[0], alpha=c[0], out=t)
                for j in range(1, len(c)):
                    t.add_(d[j], alpha=c[j])
            result[k] = t
        return result

    def _fresh_floating(self, c: list, rows: dict, entries: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """state_at's contiguous floating `entries` in new memory, by foreach ops: the same
        sums, in a launch per group of tensors rather than per tensor (W3's 293 tensors)."""
        keys = [k for k, o in entries.items() if k in rows and o.is_contiguous()]
        if len(keys) < 2:  # (a foreach op over one tensor costs several times the op itself)
            return {}
        values = torch._foreach_add([self._origin[k] for k in keys], [rows[k][0] for k in keys], alpha=c[0])
        for j in range(1, len(c)):
            torch._foreach_add_(values, [rows[k][j] for k in keys], alpha=c[j])
        return dict(zip(keys, values))

    def coords_tensor(self, coords: Any) -> Tensor:
        """Normalise user coordinates to a float64 CPU tensor of shape (K, J), K ≥ 1.

        - int n: n evenly spaced points on [0, 1] (J = 1), or the n×n grid on [0, 1]²
          (J = 2), row-major: the first coordinate varies slowest.
        - 1-D sequence / tensor of K values (J = 1 only): shape (K, 1).
        - (K, J) sequence / tensor / array: returned as is (copied, float64).
        Raises ValueError for any other shape, K = 0, non-finite values, or values beyond
        the range of the space's floating dtypes.
        """
        J = self.num_directions
        if isinstance(coords, Tensor) and coords.dim() == 0 and not (coords.is_floating_point() or coords.is_complex()
                                                                    or coords.dtype == torch.bool):
            coords = int(coords)  # (a count given as a 0-d tensor)
        if isinstance(coords, numbers.Integral) and not isinstance(coords, bool):
            n = int(coords)
            if n < 1:
                raise ValueError(f"coords={n}: the number of points must be at least 1.")
            g = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
            if J == 1:
                return g.unsqueeze(1)
            if J == 2:
                a, b = torch.meshgrid(g, g, indexing="ij")
                return torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
            raise ValueError(
                f"coords={n}: an integer number of points is defined only for J = 1 or 2; "
                f"this {self.kind} has J={J}, so pass a (K, {J}) array of coordinates."
            )
        expected = "(K,) or (K, 1)" if J == 1 else f"(K, {J})"
        if isinstance(coords, (bool, str)):
            raise ValueError(f"coords must be an int or an array of shape {expected}; got {coords!r}.")
        if isinstance(coords, Tensor) and (coords.requires_grad or transformed(coords)):
            raise ValueError("coords carry derivatives, which the points do not follow (they are read as "
                             "float64 numbers); derivatives along a line: mlifast.mli.gauss_length.")
        try:
            t = torch.as_tensor(coords, dtype=torch.float64).detach().to("cpu").clone(memory_format=torch.contiguous_format)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"coords must be an int or an array of shape {expected}; could not read "
                f"{type(coords).__name__}: {e}"
            ) from None
        if t.dim() == 1 and J == 1:
            t = t.unsqueeze(1)
        if t.dim() != 2 or t.shape[1] != J:
            raise ValueError(
                f"coords for this {self.kind} (J={J}) must be an int or have shape "
                f"{expected}; got shape {tuple(t.shape)}."
            )
        if t.shape[0] == 0:
            raise ValueError("coords is empty; pass at least one point.")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("coords contains NaN or inf.")
        for dtype in {v.dtype for v in self._origin.values() if v.is_floating_point()}:
            if not bool(torch.isfinite(t.to(dtype)).all()):
                raise ValueError(f"coords reach {t.abs().max().item():g}, beyond what this space's {dtype} "
                                 f"tensors can hold (at most {torch.finfo(dtype).max:g}).")
        return t

    # -- conversion and metadata --------------------------------------------------

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "Span":
        """This span on ``device``; ``dtype`` (floating) applies to floating entries only.
        Returns ``self`` when every tensor already matches (spans are read-only), else a new
        span of the same class sharing the tensors that match."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype; got {dtype}.")
        if self._already(device, dtype):
            return self
        new = object.__new__(type(self))
        new._origin = {
            k: t.to(device=device, dtype=dtype if _is_floating(t) else None)
            for k, t in self._origin.items()
        }
        new._directions = {k: d.to(device=device, dtype=dtype) for k, d in self._directions.items()}
        if all(new._origin[k] is t for k, t in self._origin.items()) and all(
            new._directions[k] is d for k, d in self._directions.items()
        ):
            return self
        new._built = dict(self._built)
        if all(new._directions[k].dtype == d.dtype for k, d in self._directions.items()):
            new._frozen = dict(self._frozen)  # a move between devices changes no value
            new._direction_norms = self._direction_norms
            return new
        _check_origin_finite(new._origin, new._directions, f"origin after .to({dtype}) (overflow)")
        _check_finite(
            {k: d for k, d in new._directions.items()}, f"directions after .to({dtype})",
            new._origin, " (overflow)",
        )
        new._refresh()
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_rows", None)  # (pickled, each view would carry its whole stack of directions)
        return state

    def _direction_rows(self) -> dict[str, tuple[Tensor, ...]]:
        """Each entry's J directions as views, made once (indexing a view per tensor and
        point cost a dispatch each)."""
        rows = self.__dict__.get("_rows")
        if rows is None:
            rows = {k: d.unbind(0) for k, d in self._directions.items()}
            if torch._C._functorch.maybe_current_level() is None:  # (views made in a transform die with it)
                self._rows = rows
        return rows

    def _already(self, device: Any, dtype: torch.dtype | None) -> bool:
        """Whether every tensor is on ``device`` and floating ones in ``dtype`` (None: any),
        read from their attributes: a `.to` per tensor costs evaluate a dispatch each."""
        target = None if device is None else torch.device(device)
        if target is not None and target.type != "cpu" and target.index is None:
            return False  # ("cuda": the current device, whichever that is)
        return all((target is None or t.device == target) and (dtype is None or not _is_floating(t) or t.dtype == dtype)
                   for t in (*self._origin.values(), *self._directions.values()))

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary: kind, J, entry and element counts, dtypes, devices,
        the global L2 norm of each direction (over all floating entries, float64), and how
        the span was built."""
        dtypes: dict[str, int] = {}
        for t in self._origin.values():
            dtypes[str(t.dtype)] = dtypes.get(str(t.dtype), 0) + 1
        J = self.num_directions
        if self._direction_norms is None:
            sq = torch.zeros(J, dtype=torch.float64)
            for d in self._directions.values():
                sq += torch.linalg.vector_norm(d.detach().reshape(J, -1), dim=1, dtype=torch.float64).pow(2).cpu()
            self._direction_norms = [float(x) for x in sq.sqrt()]
        return {
            "kind": self.kind,
            "J": J,
            "num_tensors": len(self._origin),
            "num_floating_tensors": len(self._directions),
            "num_frozen_tensors": sum(self._frozen.values()),
            "num_elements": sum(t.numel() for t in self._origin.values()),
            "num_floating_elements": sum(self._origin[k].numel() for k in self._directions),
            "dtypes": dtypes,
            "devices": sorted({str(t.device) for t in self._origin.values()}),
            "direction_norms": list(self._direction_norms),
            "built": dict(self._built),
        }

    def __repr__(self) -> str:
        info = self.describe()
        return (
            f"{type(self).__name__}(J={info['J']}, tensors={info['num_tensors']}, "
            f"floating_elements={info['num_floating_elements']}, dtypes={info['dtypes']})"
        )


# ----------------------------------------------------------------------------- Line, Plane


def _differences(
    base: StateLike, others: list[StateLike], base_role: str, roles: list[str]
) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
    """Validate ``others`` against ``base`` and return (base state, {key: [other − base]})
    with differences computed in the entries' own dtype. An entry may hold ±inf where every
    point has the same value (0 in each difference)."""
    b = read_state(base, base_role)
    _check_origin(b, base_role)
    states = []
    for other, role in zip(others, roles):
        s = read_state(other, role)
        _check_against(b, s, base_role, role, _ENDPOINT_FIX)
        _check_finite(s, role, b, same_as=b)
        states.append(s)
    floating = [k for k, t in b.items() if _is_floating(t)]
    diffs = {k: [_difference(s[k], b[k]) for s in states] for k in floating}
    _check_origin_finite(b, diffs, base_role)
    for j, role in enumerate(roles):
        _check_finite(
            {k: ds[j] for k, ds in diffs.items()}, f"{role} − {base_role}", b,
            " (the difference overflows this dtype; use a wider dtype)",
        )
    return b, diffs


class Line(Span):
    """The line θ(α) = start + α · (end − start): origin ``start``, one direction
    ``end − start`` (computed in each entry's dtype). α = 0 is start, α = 1 is end.

    ``start`` and ``end``: ``nn.Module`` or state dict of the same architecture, with
    matching floating entries (keys, shapes, dtypes, devices). Non-floating entries
    (``num_batches_tracked``) come from ``start``.
    """

    kind = "line"

    def __init__(self, start: StateLike, end: StateLike) -> None:
        s, diffs = _differences(start, [end], "start", ["end"])
        self._init_parts(
            s, diffs,
            {"method": "Line(start, end)", "start": _describe_source(start),
             "end": _describe_source(end)},
        )

    @property
    def start(self) -> dict[str, Tensor]:
        """The point α = 0 (same as ``origin``)."""
        return self.origin


class Plane(Span):
    """The plane θ(a, b) = origin + a·u + b·v, J = 2.

    ``u`` and ``v`` are direction state dicts (see :class:`Span`); use
    :meth:`Plane.through` to build the plane through three points.
    """

    kind = "plane"

    def __init__(self, origin: StateLike, u: StateLike, v: StateLike) -> None:
        self._init_checked(origin, [("u", u), ("v", v)],
                           {"method": "Plane(origin, u, v)", "origin": _describe_source(origin)})

    @classmethod
    def through(cls, p0: StateLike, p1: StateLike, p2: StateLike) -> "Plane":
        """The plane through three points: u = p1 − p0, v = p2 − p0, so coordinates
        (0, 0) = p0, (1, 0) = p1, (0, 1) = p2. Non-floating entries come from p0."""
        b, diffs = _differences(p0, [p1, p2], "p0", ["p1", "p2"])
        plane = object.__new__(cls)
        plane._init_parts(
            b, diffs,
            {"method": "Plane.through(p0, p1, p2)",
             **{r: _describe_source(p) for r, p in (("p0", p0), ("p1", p1), ("p2", p2))}},
        )
        return plane


def on_segment(alphas: Any) -> Tensor:
    """(K,) bool: the points of an increasing α grid in [0, 1], the segment θ0 → θT,
    give or take `grid_slack` (the rounding of a grid made in float32: linspace(−0.3,
    1.3, 17) puts its zero at −3e-8)."""
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    slack = grid_slack(a)
    return (a >= -slack) & (a <= 1 + slack)


def grid_slack(alphas: Tensor) -> float:
    """How far from a value an increasing (K,) α grid's point may lie and still be read as
    it: a thousandth of the grid's smallest step (0 for one point)."""
    return 1e-3 * alphas.diff().min().item() if len(alphas) > 1 else 0.0
