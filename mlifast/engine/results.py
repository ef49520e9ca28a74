"""The result of `evaluate`: per-point means over a data set, saved as JSON."""
from __future__ import annotations

import json
import math
import os
import secrets
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
    """Read a result written by `Results.save`; ValueError naming the file where it is
    not one (or not whole)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not an mlifast result file (not JSON: {error})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if type(found) is not int or found != FORMAT_VERSION:
        newer = type(found) is int and found > FORMAT_VERSION
        raise ValueError(f"{path}: not an mlifast result file of format {FORMAT_VERSION} (its format: {found!r})"
                         + ("; a newer mlifast may read it" if newer else ""))
    try:
        coords = torch.tensor(data["coords"], dtype=torch.float64)
        values = {k: torch.tensor([float_from_json(v) for v in vs], dtype=torch.float64)
                  for k, vs in data["values"].items()}
        meta = data["meta"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: a damaged mlifast result file ({type(error).__name__}: {error})") from None
    points = coords.shape[0] if coords.dim() == 2 else -1
    if coords.dim() != 2 or any(v.shape != (points,) for v in values.values()):
        raise ValueError(f"{path}: a damaged mlifast result file: coords of shape {tuple(coords.shape)} and "
                         f"values of lengths {[len(v) for v in values.values()]} (one value a point)")
    return Results(coords=coords, values=values, meta=meta)


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
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # (the umask's mode, as open() gives)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(float_to_json(obj), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
