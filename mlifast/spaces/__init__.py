"""Points of weight space: affine subspaces (Span, Line, Plane) and random directions.

Depends only on torch; no other mlifast layer is imported here.
"""

from .directions import random_direction
from .span import Line, Plane, Span

__all__ = ["Span", "Line", "Plane", "random_direction"]
