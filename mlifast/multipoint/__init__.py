"""The multi-point model: any nn.Module answering for K points of weight space at once."""
from mlifast.multipoint.model import MultiPointModel, NotPerExampleOutputError, interpolate
from mlifast.multipoint.registry import register_rule
from mlifast.multipoint.rule import MultiPointRule
from mlifast.multipoint.unhandled import UnhandledParameterError

__all__ = ["MultiPointModel", "MultiPointRule", "NotPerExampleOutputError", "UnhandledParameterError",
           "interpolate", "register_rule"]
