"""Points of weight space: affine subspaces (Span, Line, Plane) and random directions.

Depends on torch and, below it, the ops layer's argument checks only.
`read_state` turns a module or state dict into a validated dict of tensors.
"""

from .directions import random_direction
from .span import Line, Plane, Span, on_segment, read_state

__all__ = ["Span", "Line", "Plane", "on_segment", "random_direction", "read_state"]
