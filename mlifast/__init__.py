"""mlifast: evaluate any nn.Module at many points of weight space in one pass.

    line = mlifast.Line(init_model, trained_model)
    res = mlifast.evaluate(model, line, data, coords=50)   # res["loss"]: (50,)
"""
from mlifast import datasets, models, ops
from mlifast.analysis import mli
from mlifast._extension import info, warn_if_not_compiled
from mlifast.engine import Results, evaluate, load
from mlifast.multipoint import (
    MultiPointModel, NotPerExampleOutputError, UnhandledParameterError, interpolate, register_rule,
)
from mlifast.spaces import Line, Plane, Span, random_direction

__version__ = "0.1.0"
__all__ = [
    "Line", "MultiPointModel", "datasets", "models", "NotPerExampleOutputError", "Plane", "Results", "Span",
    "UnhandledParameterError", "evaluate", "info", "interpolate", "load", "ops",
    "mli", "random_direction", "register_rule", "__version__",
]

warn_if_not_compiled()
