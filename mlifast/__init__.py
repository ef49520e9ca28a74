"""mlifast: evaluate any nn.Module at many points of weight space in one pass."""
from mlifast import ops
from mlifast._extension import info, warn_if_not_compiled

__version__ = "0.1.0"
__all__ = ["info", "ops", "__version__"]

warn_if_not_compiled()
