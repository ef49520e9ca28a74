"""copy.deepcopy of a module tree, in a fraction of its time.

Every evaluate call copies the user's model twice (the multi-point copy and the reference
for the first-call check). copy.deepcopy spends most of that on each module's dozen empty
hook dictionaries and on its generic pickling protocol: 11 ms for a 24-block transformer,
more than the rest of a call on a GPU. `copy_module_tree` gives the same copy: it builds
each plain module the way copy.deepcopy does (`__new__`, its dict state deep-copied, then
`__setstate__`), copies dicts (exactly dict, or OrderedDict without attributes) and atoms
directly, and leaves everything else to copy.deepcopy with the same memo, so shared
objects stay shared.
"""
from __future__ import annotations

import copy
import copyreg
import weakref
from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

_ATOMS = (type(None), bool, int, float, complex, str, bytes, type)
_SETS = (set, frozenset)


def copy_module_tree(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """copy.deepcopy(model, memo): tensors whose id is in `memo` become its values."""
    return _copy(model, memo)


def _copy(x: Any, memo: dict[int, Any]) -> Any:
    found = memo.get(id(x), memo)
    if found is not memo:
        return found
    cls = type(x)
    if cls in _ATOMS:
        return x
    if cls is dict or (cls is OrderedDict and not vars(x)):  # (hooks, _modules, _parameters, _buffers)
        y = memo[id(x)] = cls()
        for k, v in x.items():
            y[k if type(k) in _ATOMS else _copy(k, memo)] = v if type(v) in _ATOMS else _copy(v, memo)
        return y
    if cls is tuple and all(type(v) in _ATOMS for v in x):  # (a shape: copy.deepcopy returns it too)
        return x
    if cls in _SETS and all(type(v) in _ATOMS for v in x):  # (_non_persistent_buffers_set)
        y = memo[id(x)] = cls(x)
        return y
    if isinstance(x, nn.Module) and _plain(cls) and "__deepcopy__" not in x.__dict__:
        getstate = getattr(x, "__getstate__", None)  # (object's from Python 3.11)
        state = getstate() if getstate is not None else x.__dict__
        if type(state) is dict:
            for name, value in state.items():
                if isinstance(value, Tensor) and not value.is_leaf and id(value) not in memo:
                    raise TypeError(
                        f"mlifast: {cls.__name__}.{name} is a tensor computed with autograd, which cannot be "
                        "copied (copy.deepcopy refuses it too). The deprecated torch.nn.utils.weight_norm and "
                        "spectral_norm keep their weight so: use torch.nn.utils.parametrizations.weight_norm or "
                        "spectral_norm instead. A kept activation: detach it, or delete the attribute."
                    )
            memo.setdefault(id(memo), []).append(state)  # (as copy.deepcopy keeps its temporaries alive)
            y = memo[id(x)] = cls.__new__(cls)
            copied = {}
            for k, v in state.items():  # (atoms and empty dicts inline: most of a module's entries)
                kind = type(v)
                if kind in _ATOMS:
                    copied[k] = v
                elif (kind is dict or kind is OrderedDict and not vars(v)) and not v and id(v) not in memo:
                    copied[k] = memo[id(v)] = kind()
                else:
                    copied[k] = _copy(v, memo)
            y.__setstate__(copied)
            return y
    return copy.deepcopy(x, memo)


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # class -> _plain's answer


def _plain(cls: type) -> bool:
    """Whether copy.deepcopy would copy instances of `cls` as __new__ plus __setstate__ of
    their __getstate__: no __deepcopy__, __reduce__, __getnewargs__, __getattr__ or
    __slots__ of its own, and not a container (a dict or list module's items travel in its
    __reduce_ex__). Answered once per class (a class given a __deepcopy__ later keeps it)."""
    plain = _PLAIN.get(cls)
    if plain is None:
        plain = _PLAIN[cls] = (
            getattr(cls, "__deepcopy__", None) is None and cls not in copyreg.dispatch_table
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and getattr(cls, "__getnewargs__", None) is None and getattr(cls, "__getnewargs_ex__", None) is None
            and cls.__getattr__ is nn.Module.__getattr__  # (one of its own may answer __deepcopy__: jit)
            and not issubclass(cls, (dict, list, set, tuple))
            and not any("__slots__" in vars(c) for c in cls.__mro__[:-1]))
    return plain
