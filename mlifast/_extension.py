"""Loading the compiled operators, the pure-PyTorch fallback, and `info()`.

Importing this module makes every operator of `torch.ops.mlifast` callable on every
device: the C++/CUDA kernels of `mlifast._C` where they were built, the pure-PyTorch
reference implementations elsewhere (with one warning naming what is missing).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

NAMESPACE = "mlifast"

try:
    from mlifast import _C  # noqa: F401  (import registers the compiled operators)

    COMPILED_ERROR: str | None = None
    WITH_CUDA = bool(_C.with_cuda)
except ImportError as error:  # not built, or built against another torch
    COMPILED_ERROR = f"{type(error).__name__}: {error}"
    WITH_CUDA = False

_library = torch.library.Library(NAMESPACE, "DEF" if COMPILED_ERROR else "FRAGMENT")
_BACKENDS: dict[str, dict[str, str]] = {}
_DEVICES = ("CPU", "CUDA")


def _has_kernel(qualname: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)


def register_op(name: str, schema: str, reference: Callable) -> None:
    """Make `torch.ops.mlifast.<name>` available on every device.

    `schema` is used only when the extension is missing (the compiled library defines
    it otherwise, in csrc/ops.cpp, and the two must agree). `reference` is registered
    for each device that has no compiled kernel.
    """
    qualname = f"{NAMESPACE}::{name}"
    if COMPILED_ERROR:
        _library.define(schema)
    backends = {}
    for key in _DEVICES:
        if _has_kernel(qualname, key):
            backends[key.lower()] = "cuda" if key == "CUDA" else "cpp"
        else:
            _library.impl(name, reference, key)
            backends[key.lower()] = "reference"
    _BACKENDS[name] = backends


def compiled(name: str, device_type: str) -> bool:
    """Whether `torch.ops.mlifast.<name>` runs a compiled kernel on `device_type` ("cpu", "cuda")."""
    return _BACKENDS.get(name, {}).get(device_type) in ("cpp", "cuda")


def warn_if_not_compiled() -> None:
    if COMPILED_ERROR:
        warnings.warn(
            "mlifast: the compiled extension is not available, every operator runs its "
            f"pure-PyTorch reference ({COMPILED_ERROR}). Rebuild it with "
            "`pip install --no-build-isolation -e .` against the torch you run.",
            RuntimeWarning,
            stacklevel=3,
        )


def info() -> dict:
    """Which backend runs each operator per device, and what the build contains.

    Returns a dict: `ops` maps operator name -> {"cpu": ..., "cuda": ...} with values
    "cpp", "cuda" or "reference"; `compiled` tells whether mlifast._C loaded (and
    `compiled_error` why not); `cuda_kernels` whether CUDA kernels were compiled in;
    `torch` and `torch_cuda` the running torch and its CUDA version.
    """
    return {
        "ops": {name: dict(backends) for name, backends in _BACKENDS.items()},
        "compiled": COMPILED_ERROR is None,
        "compiled_error": COMPILED_ERROR,
        "cuda_kernels": WITH_CUDA,
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
