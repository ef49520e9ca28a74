"""Metrics of Monotonic Linear Interpolation (MLI) and linear mode connectivity.

Pure functions over sampled loss curves L_i = L(θ_{α_i}), i = 0 … n−1, on a grid
α_0 < α_1 < … < α_{n−1} (usually ``numpy.linspace(0, 1, 50)``), and over pairs of weight
vectors. Curves may be 1-D torch tensors, numpy arrays or lists; they are read as float64.
Results are Python floats or small frozen dataclasses. Loss-valued results are in the
units of the loss curve (raw, never normalised); α-valued results in the units of ``alphas``.

References
----------
- Lucas, Bae, Zhang, Fort, Zemel, Grosse, "Analyzing Monotonic Linear Interpolation in
  Neural Network Loss Landscapes", ICML 2021 (arXiv 2104.11044), and the official code
  ``AtheMathmo/mli-release`` (``lib/mli/metrics/monotonicity.py``, ``dist.py``, the
  ``tabulate_runs.py`` scripts).
- Frankle, Dziugaite, Roy, Carbin, "Linear Mode Connectivity and the Lottery Ticket
  Hypothesis", ICML 2020: the barrier over the *mean* of the endpoints
  (:func:`endpoint_barrier`).
- Entezari, Sedghi, Saukh, Neyshabur, "The Role of Permutation Invariance in Linear Mode
  Connectivity of Neural Networks", ICLR 2022: the barrier over the *chord* between the
  endpoint losses (:func:`barrier_height`).
- Lim et al., NeurIPS 2024: the largest single-step increase (:func:`max_step_increase`).

This module depends only on numpy and torch (no other mlifast layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from mlifast._messages import list_names
from mlifast.spaces import on_segment, read_state

__all__ = [
    "Bump",
    "MLISummary",
    "NonMonotonicFraction",
    "RUNNING_STAT_SUFFIXES",
    "average_bump_height",
    "barrier_height",
    "bumps",
    "default_distance_include",
    "delta_min",
    "endpoint_barrier",
    "fraction_non_monotonic",
    "is_monotonic",
    "max_step_increase",
    "report",
    "summarize",
    "weight_distance",
]

CurveLike = Union[Tensor, np.ndarray, Sequence[float]]
StateLike = Union[nn.Module, Mapping[str, Tensor]]

RUNNING_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
"""Last key components excluded from :func:`weight_distance` by default."""

_MAX_NAMES = 10


# ----------------------------------------------------------------------------- helpers


def _as_array(x: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """``x`` as a 1-D float64 numpy array (a copy). Raises ValueError/TypeError otherwise."""
    if isinstance(x, Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real, got a {x.dtype} tensor.")
        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
    else:
        try:
            arr = np.array(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} must be a 1-D tensor, numpy array or list of numbers "
                f"({type(x).__name__} given): {exc}"
            ) from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}.")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty; a curve needs at least one point.")
    return arr


def _as_grid(alphas: Any, losses: Any) -> tuple[np.ndarray, np.ndarray]:
    a = _as_array(alphas, "alphas")
    l = _as_array(losses, "losses")
    if a.shape != l.shape:
        raise ValueError(
            f"alphas and losses must have the same length, got {a.size} and {l.size}."
        )
    if not np.all(np.isfinite(a)):
        raise ValueError("alphas must be finite.")
    if a.size > 1 and not np.all(np.diff(a) > 0):
        raise ValueError("alphas must be strictly increasing.")
    return a, l


def _names(keys: Iterable[Any], limit: int = _MAX_NAMES) -> str:
    return list_names(keys, limit)


# ----------------------------------------------------------------------------- Δ_min


def delta_min(losses: CurveLike) -> float:
    """Δ_min: the smallest Δ ≥ 0 for which the curve is Δ-monotone (Lucas et al. 2021).

    Formula::

        Δ_min = max(0, max_{0 ≤ i < j ≤ n−1} (L_j − L_i))
              = max_j (L_j − min_{i ≤ j} L_i)          (computed this way, O(n))

    i.e. the largest rise of the loss above its running minimum — the paper's "min Δ" /
    "max Δ" / "max bump". Units: loss units (not normalised). It depends only on the
    sampled loss values, not on the α grid (but a coarser grid can miss a bump).

    Returns 0.0 for a non-increasing curve and for a single point; ``nan`` if any loss is
    NaN; ``inf`` for an unbounded rise (e.g. a finite loss followed by ``inf``). A run of
    equal infinite values counts as no rise. Raises ValueError on an empty or non-1-D input.
    """
    l = _as_array(losses, "losses")
    if np.isnan(l).any():
        return float("nan")
    run_min = np.minimum.accumulate(l)
    with np.errstate(invalid="ignore"):
        rise = np.where(l == run_min, 0.0, l - run_min)
    return float(max(0.0, rise.max()))


def max_step_increase(losses: CurveLike) -> float:
    """Largest single-step increase, max(0, max_i (L_{i+1} − L_i)), in loss units.

    The "Δ" of Lim et al. (2024); never larger than :func:`delta_min` (which compares all
    pairs i < j, not only neighbours). 0.0 for a single point, ``nan`` if any loss is NaN.
    """
    l = _as_array(losses, "losses")
    if np.isnan(l).any():
        return float("nan")
    if l.size < 2:
        return 0.0
    with np.errstate(invalid="ignore"):
        steps = np.where(l[1:] == l[:-1], 0.0, l[1:] - l[:-1])
    return float(max(0.0, steps.max()))


def is_monotonic(losses: CurveLike, tol: float = 0.0) -> bool:
    """Whether every step is non-increasing up to ``tol``: L_{i+1} ≤ L_i + tol for all i.

    With ``tol = 0`` this is the MLI property on the sampled grid, and for a finite curve
    ``is_monotonic(L)`` ⇔ ``delta_min(L) == 0``. With ``tol > 0`` the tolerance is *per
    step*: many small rises can add up to a total rise (Δ_min) far above ``tol``. The
    paper's "non-monotonic" flag is ``delta_min(L) > threshold`` instead (threshold 1e-3 for
    the MNIST/Fashion-MNIST MLP table, 0 for CIFAR) — use that for Δ-monotonicity.

    ``tol`` is in loss units and must be ≥ 0. A curve containing NaN is not monotonic.
    A single point is monotonic.
    """
    tol = float(tol)
    if not tol >= 0.0:
        raise ValueError(f"tol must be a number ≥ 0, got {tol}.")
    l = _as_array(losses, "losses")
    if np.isnan(l).any():
        return False
    return bool(np.all(l[1:] <= l[:-1] + tol))


# ----------------------------------------------------------------------------- bumps


@dataclass(frozen=True)
class Bump:
    """One non-monotonic bump of an interpolation curve.

    Attributes:
        start: α at the bump's start s (the last point before the loss rises).
        end: α at the bump's end e (the first point whose loss is below L_s, or the last
            grid point if the loss never falls below L_s again).
        height: max_{s ≤ i ≤ e} (L_i − L_s), in loss units (> 0).
        start_index, end_index: s and e as indices into the grid.
        closed: True if the loss fell strictly below L_s at ``end``; False if the bump was
            still open at the last grid point.
    """

    start: float
    end: float
    height: float
    start_index: Optional[int] = None
    end_index: Optional[int] = None
    closed: Optional[bool] = None

    @property
    def width(self) -> float:
        """α_e − α_s, the bump width of the official code (α units)."""
        return self.end - self.start


def bumps(alphas: CurveLike, losses: CurveLike) -> list[Bump]:
    """Every non-monotonic bump of the curve, left to right.

    Definition (that of the official code's ``eval_monotonic``): scan i = 1 … n−1.
    Outside a bump, a rise L_i > L_{i−1} opens a bump at s = i−1. Inside a bump,
    the height is the running maximum of L_i − L_s; the bump ends at the first e with
    L_e < L_s (strictly). A bump still open at the last point closes there
    (``closed=False``). Heights are in loss units, ``start``/``end`` in α units.

    Difference from the official code: the official scan never records a rise that
    *begins* at the last step (L_{n−1} > L_{n−2} while not inside a bump), so e.g.
    ``[1, 0.8, 0.5, 0.2, 0.3]`` has no bump there although Δ_min = 0.1. Here that rise is a
    bump from α_{n−2} to α_{n−1} (``closed=False``). Every other bump is identical.

    Relation to Δ_min (exact, also in floating point): at every bump start L_s is the
    running minimum of the curve, and it stays so until the bump ends, so each height is
    the largest rise above the running minimum within the bump, and outside bumps that rise
    is 0. Hence ``max(b.height for b in bumps(...))`` (0 if there are none) equals
    :func:`delta_min`. A second, higher peak after a dip that does not go below L_s
    belongs to the *same* bump (the bump count merges such peaks; the height is the higher
    rise). ``bumps(...) == []`` ⇔ the curve is non-increasing.

    Raises ValueError if the lengths differ, ``alphas`` is not strictly increasing and
    finite, or any loss is NaN (a bump is undefined there; call :func:`delta_min`, which
    returns nan).
    """
    a, l = _as_grid(alphas, losses)
    if np.isnan(l).any():
        raise ValueError("losses contain NaN; bumps are undefined for such a curve.")
    n = l.size
    out: list[Bump] = []
    s = -1  # start index of the open bump, -1 when outside a bump
    height = 0.0
    for i in range(1, n):
        li = l[i]
        if s < 0:
            if li > l[i - 1]:
                s = i - 1
                height = float(li - l[s])
        elif li < l[s]:
            out.append(Bump(float(a[s]), float(a[i]), height, s, i, True))
            s = -1
            continue
        else:
            height = max(height, float(li - l[s]))
        if s >= 0 and i == n - 1:
            out.append(Bump(float(a[s]), float(a[i]), height, s, i, False))
    return out


# ----------------------------------------------------------------------------- barriers


def barrier_height(alphas: CurveLike, losses: CurveLike) -> float:
    """Loss barrier above the chord between the endpoint losses (Entezari et al. 2022).

    Formula, with t_i = (α_i − α_0) / (α_{n−1} − α_0) ∈ [0, 1]::

        B = max_i [ L_i − ((1 − t_i) · L_0 + t_i · L_{n−1}) ]

    On the usual grid α ∈ [0, 1] this is max_α L(θ_α) − [(1−α) L(θ_0) + α L(θ_1)]. On an
    extended grid (e.g. [−0.3, 1.3]) the chord joins the *first and last samples*; slice the
    curve to [0, 1] first if the chord between θ_0 and θ_1 is wanted. The endpoints
    contribute exactly 0, so B ≥ 0. Units: loss units. ``nan`` if any loss is NaN (or an
    endpoint loss is infinite). Needs at least two points.

    Note: this chord version is sometimes attributed to Frankle et al. (2020); their
    "error barrier height" is the max over the *mean* of the endpoints —
    :func:`endpoint_barrier`.
    """
    a, l = _as_grid(alphas, losses)
    if l.size < 2:
        raise ValueError("barrier_height needs at least two points.")
    t = (a - a[0]) / (a[-1] - a[0])
    t[-1] = 1.0
    with np.errstate(invalid="ignore"):
        chord = (1.0 - t) * l[0] + t * l[-1]
        chord[0], chord[-1] = l[0], l[-1]
        excess = l - chord
    if np.isnan(excess).any():
        return float("nan")
    return float(max(0.0, excess.max()))


def endpoint_barrier(losses: CurveLike) -> float:
    """Barrier over the mean endpoint loss (Frankle et al. 2020's "error barrier height").

    Formula::

        B_mean = max_i L_i − (L_0 + L_{n−1}) / 2

    ≥ 0 always. It equals :func:`barrier_height` when L_0 = L_{n−1}; otherwise either can
    be the larger (a peak next to the lower endpoint is measured against a lower chord).
    Units: loss units (apply it to an error curve for Frankle et al.'s error barrier).
    ``nan`` if any loss is NaN. Needs at least two points.
    """
    l = _as_array(losses, "losses")
    if l.size < 2:
        raise ValueError("endpoint_barrier needs at least two points.")
    if np.isnan(l).any():
        return float("nan")
    with np.errstate(invalid="ignore"):
        value = l.max() - 0.5 * (l[0] + l[-1])
    return float(value)


# ----------------------------------------------------------------------------- distances


def default_distance_include(key: str) -> bool:
    """False for batch-norm running statistics (last key component ``running_mean``,
    ``running_var`` or ``num_batches_tracked``), True otherwise."""
    return key.rsplit(".", 1)[-1] not in RUNNING_STAT_SUFFIXES


def weight_distance(
    start: StateLike,
    end: StateLike,
    normalized: bool = False,
    include: Union[Callable[[str], bool], Iterable[str], None] = None,
) -> float:
    """Euclidean distance between two weight vectors, ‖θ_T − θ_0‖₂ (Lucas et al. 2021 §1.4).

    Formula, over the selected entries E::

        d = sqrt( Σ_{k ∈ E} Σ (end[k] − start[k])² )
        normalized=True:  d / sqrt( Σ_{k ∈ E} Σ start[k]² )      (= ‖θ_T − θ_0‖ / ‖θ_0‖)

    Units: weight units (the same as the parameters); the normalised form is a pure ratio,
    with the *first* argument's norm as denominator, as in the official ``param_dist``.
    Computed in float64 (entries are upcast one at a time, so float32/bfloat16 checkpoints
    neither overflow nor lose precision in the sum).

    Args:
        start, end: ``nn.Module`` (its ``state_dict()``) or state dicts.
        normalized: divide by ‖start‖₂ over the same entries.
        include: which entries count. ``None`` (default): every floating-point entry except
            batch-norm running statistics (keys whose last component is ``running_mean``,
            ``running_var`` or ``num_batches_tracked``); parameters, including norm
            layers' affine γ and β, count; integer buffers (e.g. ``position_ids``) are
            skipped. A callable ``key -> bool`` selects keys (running statistics are then
            counted only if it selects them); an iterable of key names selects exactly
            those. With an explicit ``include``, integer entries it selects are counted
            (as float64).

    Raises:
        ValueError: the selected entries differ between ``start`` and ``end`` (names the
            keys missing on either side and the keys whose shapes differ), nothing is
            selected, or ``normalized=True`` and ‖start‖ = 0.
        TypeError: an argument is neither a Module nor a mapping of str to Tensor, or a
            selected entry is complex.

    The official code excludes keys *containing* ``running`` or ``batches``; the default
    here matches it for every standard norm layer.
    """
    s_state = read_state(start, "weight_distance: start")
    e_state = read_state(end, "weight_distance: end")

    explicit: Optional[set[str]] = None
    if include is None:
        pred: Callable[[str], bool] = default_distance_include
    elif callable(include):
        pred = include
    else:
        if isinstance(include, str):
            raise TypeError("include must be a callable or an iterable of keys, not a str.")
        explicit = set(include)
        pred = explicit.__contains__

    s_keys = [k for k in s_state if pred(k)]
    e_keys = [k for k in e_state if pred(k)]
    if include is None:
        s_keys = [k for k in s_keys if s_state[k].is_floating_point()]
        e_keys = [k for k in e_keys if e_state[k].is_floating_point()]

    problems = []
    missing_end = [k for k in s_keys if k not in e_state]
    missing_start = [k for k in e_keys if k not in s_state]
    if explicit is not None:
        absent = sorted(k for k in explicit if k not in s_state and k not in e_state)
        if absent:
            problems.append(f"keys named in include found in neither: {_names(absent)}")
    if missing_end:
        problems.append(f"missing in end: {_names(missing_end)}")
    if missing_start:
        problems.append(f"missing in start: {_names(missing_start)}")
    shape_bad = [
        f"{k!r} {tuple(s_state[k].shape)} vs {tuple(e_state[k].shape)}"
        for k in s_keys
        if k in e_state and tuple(s_state[k].shape) != tuple(e_state[k].shape)
    ]
    if shape_bad:
        more = f" and {len(shape_bad) - _MAX_NAMES} more" if len(shape_bad) > _MAX_NAMES else ""
        problems.append("shape mismatch (start vs end): " + ", ".join(shape_bad[:_MAX_NAMES]) + more)
    dtype_kind = [
        k for k in s_keys if k in e_state
        and s_state[k].is_floating_point() != e_state[k].is_floating_point()
    ]
    if include is None and dtype_kind:
        problems.append(f"floating in one state and not the other: {_names(dtype_kind)}")
    if problems:
        raise ValueError(
            "weight_distance: start and end do not have the same entries — "
            + "; ".join(problems)
            + ". Both must be states of the same architecture (a 'module.' prefix left by "
            "DataParallel or a renamed layer is a common cause)."
        )
    keys = s_keys
    if not keys:
        raise ValueError("weight_distance: no entries selected; check `include`.")

    diff_sq = 0.0
    start_sq = 0.0
    for k in keys:
        a, b = s_state[k].detach(), e_state[k].detach()
        if a.is_complex() or b.is_complex():
            raise TypeError(f"weight_distance: entry {k!r} is complex.")
        dev = a.device if a.device.type != "mps" else torch.device("cpu")
        a64 = a.to(device=dev, dtype=torch.float64)
        b64 = b.to(device=dev, dtype=torch.float64)
        diff_sq += float(torch.sum((b64 - a64) ** 2))
        if normalized:
            start_sq += float(torch.sum(a64 ** 2))
    dist = math.sqrt(diff_sq)
    if not normalized:
        return dist
    if start_sq == 0.0:
        raise ValueError(
            "weight_distance: ‖start‖ = 0 over the selected entries, so the normalised "
            "distance is undefined (e.g. a zero initialisation); use normalized=False."
        )
    return dist / math.sqrt(start_sq)


# ----------------------------------------------------------------------------- across runs


class NonMonotonicFraction(NamedTuple):
    """``(fraction, count)``: fraction of runs flagged non-monotonic, and the number of
    runs ``count`` (the paper's tables print ``"{fraction:.2f} ({count})"``)."""

    fraction: float
    count: int

    @property
    def non_monotonic(self) -> int:
        """Number of runs flagged non-monotonic (fraction · count)."""
        return 0 if self.count == 0 else int(round(self.fraction * self.count))


def _as_delta_mins(delta_mins: Any) -> np.ndarray:
    d = _as_array(delta_mins, "delta_mins", allow_empty=True)
    if np.isnan(d).any():
        idx = [int(i) for i in np.flatnonzero(np.isnan(d))]
        raise ValueError(
            f"delta_mins contains NaN at positions {idx[:_MAX_NAMES]}; filter out diverged "
            "runs first (the paper keeps only runs whose final training loss is below a "
            "threshold)."
        )
    if (d < 0).any():
        raise ValueError("delta_mins must be ≥ 0 (values of delta_min).")
    return d


def fraction_non_monotonic(
    delta_mins: CurveLike, threshold: float = 1e-3
) -> NonMonotonicFraction:
    """Fraction of runs that are non-monotonic, as in the paper's tables.

    Formula: a run is non-monotonic iff Δ_min > ``threshold`` (strict; loss units);
    ``fraction = #non-monotonic / N`` over the N given runs. ``threshold=1e-3`` is the
    MNIST/Fashion-MNIST MLP table's; the CIFAR table and the heatmaps use ``threshold=0``.

    Args:
        delta_mins: one Δ_min per run (e.g. ``[delta_min(c) for c in curves]``), already
            filtered by the caller's training-loss inclusion rule.

    Returns ``NonMonotonicFraction(fraction, count)`` with ``count = N``;
    ``.non_monotonic`` gives the number flagged. For no runs: ``(nan, 0)``.
    Raises ValueError on NaN or negative entries.
    """
    d = _as_delta_mins(delta_mins)
    if d.size == 0:
        return NonMonotonicFraction(float("nan"), 0)
    flagged = int(np.count_nonzero(d > float(threshold)))
    return NonMonotonicFraction(flagged / d.size, int(d.size))


def average_bump_height(delta_mins: CurveLike, threshold: float = 1e-3) -> float:
    """The paper's "Avg min Δ": mean Δ_min over the *non-monotonic* runs only.

    Formula: mean{ Δ_min(r) : Δ_min(r) > threshold }, in loss units; 0.0 if no run is
    non-monotonic (the official tables print "0"). Each run's Δ_min is its maximum bump
    height, hence the name. Same inputs and threshold convention as
    :func:`fraction_non_monotonic`.
    """
    d = _as_delta_mins(delta_mins)
    sel = d[d > float(threshold)]
    return float(sel.mean()) if sel.size else 0.0


# ----------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class MLISummary:
    """Per-run MLI statistics (see :func:`summarize`). Loss-valued fields in loss units;
    ``bumps`` is None when the curve contains NaN (a diverged run)."""

    n_points: int
    is_monotonic: bool
    delta_min: float
    bumps: Optional[tuple[Bump, ...]]
    max_step_increase: float
    barrier_height: float
    endpoint_barrier: float
    loss_start: float
    loss_end: float
    weight_distance: Optional[float] = None
    normalized_weight_distance: Optional[float] = None
    gauss_length: Optional[float] = None

    def to_dict(self) -> dict:
        """JSON-serialisable fields (NaN and inf as None)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))

    def table(self) -> str:
        """A two-column text table of the measures."""
        rows = [
            ("points", str(self.n_points)),
            ("monotonic (Δ_min = 0)", "yes" if self.is_monotonic else "no"),
            ("Δ_min", f"{self.delta_min:.4g}"),
            ("bumps", "–" if self.bumps is None else str(len(self.bumps))),
            ("largest step increase", f"{self.max_step_increase:.4g}"),
            ("barrier above chord", f"{self.barrier_height:.4g}"),
            ("barrier above endpoint mean", f"{self.endpoint_barrier:.4g}"),
            ("loss at start / end", f"{self.loss_start:.4g} / {self.loss_end:.4g}"),
        ]
        if self.weight_distance is not None:
            rows.append(("‖θT − θ0‖ (normalised)", f"{self.weight_distance:.4g} ({self.normalized_weight_distance:.3g})"))
        if self.gauss_length is not None:
            rows.append(("Gauss length (rad)", f"{self.gauss_length:.4g}"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)

    def __str__(self) -> str:
        return self.table()


def summarize(
    alphas: CurveLike,
    losses: CurveLike,
    start: Optional[StateLike] = None,
    end: Optional[StateLike] = None,
) -> MLISummary:
    """All per-run statistics of one interpolation curve (and, given both endpoint states,
    the raw and normalised weight distances with the default ``include``).

    ``is_monotonic`` is the strict property on the grid (Δ_min == 0); apply a threshold to
    ``delta_min`` for the paper's 1e-3 convention. On a grid reaching beyond [0, 1] (the
    paper's −0.5…1.5 slices) every measure is that of its points in [0, 1]: MLI is a
    property of the segment θ0 → θT. Needs at least two points there. A curve with
    NaN (a diverged run) gets ``delta_min``/barriers nan, ``is_monotonic`` False and
    ``bumps`` None. ``normalized_weight_distance`` is nan when ‖start‖ = 0.
    """
    a, l = _as_grid(alphas, losses)
    segment = on_segment(a).numpy()
    a, l = a[segment], l[segment]
    if l.size < 2:
        raise ValueError("summarize needs at least two points with α in [0, 1].")
    if (start is None) != (end is None):
        raise ValueError("pass both start and end, or neither.")
    wd = nwd = None
    if start is not None:
        wd = weight_distance(start, end)
        try:
            nwd = weight_distance(start, end, normalized=True)
        except ValueError:
            nwd = float("nan")
    return MLISummary(
        n_points=int(l.size),
        is_monotonic=is_monotonic(l),
        delta_min=delta_min(l),
        bumps=None if np.isnan(l).any() else tuple(bumps(a, l)),
        max_step_increase=max_step_increase(l),
        barrier_height=barrier_height(a, l),
        endpoint_barrier=endpoint_barrier(l),
        loss_start=float(l[0]),
        loss_end=float(l[-1]),
        weight_distance=wd,
        normalized_weight_distance=nwd,
    )


def report(
    res: Any,
    start: Optional[StateLike] = None,
    end: Optional[StateLike] = None,
    key: str = "loss",
    gauss_length: Optional[float] = None,
) -> MLISummary:
    """:func:`summarize` applied to an evaluation result along a line, with the Gauss
    length of the output path when given (see :func:`gauss_length`).

    ``res`` is anything with ``res.alphas`` (the (K,) α grid) and ``res[key]`` (the (K,)
    curve), e.g. the ``Results`` of ``mlifast.evaluate`` on a ``Line`` (duck-typed: this
    module does not import the engine). ``key`` picks the curve ("loss" by default; MLI
    is defined on the training loss).
    """
    try:
        alphas = res.alphas
    except AttributeError as exc:
        raise TypeError(
            f"report needs a result along a line with an `alphas` attribute ({exc})."
        ) from None
    summary = summarize(alphas, res[key], start, end)
    return summary if gauss_length is None else replace(summary, gauss_length=gauss_length)


# The output-path measures live in geometry.py (they run the multi-point model); they
# belong to the same study, so `mlifast.mli` offers them too.
from mlifast.analysis.geometry import gauss_length, logit_linearity  # noqa: E402

__all__ = [*__all__, "gauss_length", "logit_linearity"]
