"""The result of `evaluate`: per-point means over a data set, saved as JSON."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT_VERSION = 1


@dataclass
class Results:
    """Per-point values of one evaluation.

    coords: (K, J) float64 coordinates of the points.
    values: name ("loss", metric names) → (K,) float64 means over the data set.
    meta: JSON-serialisable description (space, model class, data size, BN policy,
        mlifast and torch versions).
    """

    coords: Tensor
    values: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def alphas(self) -> Tensor:
        """(K,) α of each point along a line (a span with one direction)."""
        if self.coords.shape[1] != 1:
            raise AttributeError(f"alphas exist for lines only; this space has {self.coords.shape[1]} directions")
        return self.coords[:, 0]

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"no value {name!r}; this result has {sorted(self.values)}") from None

    def keys(self):
        return self.values.keys()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "coords": self.coords.tolist(),
            "values": {k: t.tolist() for k, t in self.values.items()},
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (a temporary file renamed over `path`)."""
        write_json_atomically(Path(path), self.to_dict())

    def plot(self, path: str | os.PathLike) -> None:
        from mlifast.engine.plotting import plot_results

        plot_results(self, Path(path))


def load(path: str | os.PathLike) -> Results:
    """Read a result written by `Results.save`."""
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an mlifast result file (format {data.get('format')!r})")
    return Results(
        coords=torch.tensor(data["coords"], dtype=torch.float64),
        values={k: torch.tensor([float_from_json(v) for v in vs], dtype=torch.float64)
                for k, vs in data["values"].items()},
        meta=data["meta"],
    )


# Strict JSON has no NaN or infinity: NaN is written as null, ±infinity as "inf"/"-inf".
_NON_FINITE = {"inf": float("inf"), "-inf": float("-inf")}


def float_to_json(value: Any) -> Any:
    """`value` with every non-finite float inside it (lists, tuples, dicts) made strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: float_to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [float_to_json(v) for v in value]
    return value


def float_from_json(value: Any) -> float:
    """A float written by `float_to_json`: null → NaN, "inf"/"-inf" → ±infinity."""
    if value is None:
        return float("nan")
    return _NON_FINITE[value] if isinstance(value, str) else float(value)


def write_json_atomically(path: Path, obj: Any) -> None:
    """Strict JSON (see float_to_json) through a temporary file renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(float_to_json(obj), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
