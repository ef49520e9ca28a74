"""The engine: one pass over the data for every point of a space."""
from mlifast.engine.evaluate import BN_POLICIES, evaluate
from mlifast.engine.results import Results, load

__all__ = ["BN_POLICIES", "Results", "evaluate", "load"]
