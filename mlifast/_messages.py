"""Wording shared by the error messages of every layer."""
from __future__ import annotations

from typing import Any, Iterable


def list_names(keys: Iterable[Any], limit: int = 10) -> str:
    """``'a', 'b', 'c' and 7 more`` — at most ``limit`` names."""
    keys = list(keys)
    text = ", ".join(repr(k) for k in keys[:limit])
    if len(keys) > limit:
        text += f" and {len(keys) - limit} more"
    return text
