"""Walking the nested tuples, lists, dicts and dataclasses that modules take and return."""
from __future__ import annotations

import copy
import dataclasses
from itertools import islice
from typing import Any, Callable, Iterator

from torch import Tensor


def tensors_in(tree: Any) -> Iterator[Tensor]:
    """Every tensor of a nested structure of tuples, lists, dicts and dataclasses, depth first."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from tensors_in(v)
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors_in(v)
    elif is_dataclass_instance(tree):
        for value in fields_of(tree).values():
            yield from tensors_in(value)


def unreadable_holders(tree: Any, path: str = "") -> list[str]:
    """Where in `tree` tensors sit inside other objects, out of tensors_in's reach
    (e.g. "output['past_key_values'] (DynamicCache)")."""
    if isinstance(tree, (tuple, list)):
        return [p for i, v in enumerate(tree) for p in unreadable_holders(v, f"{path}[{i}]")]
    if isinstance(tree, dict):
        return [p for key, v in tree.items() for p in unreadable_holders(v, f"{path}[{key!r}]")]
    if is_dataclass_instance(tree):
        return [p for name, v in fields_of(tree).items() for p in unreadable_holders(v, f"{path}.{name}")]
    return [f"{path} ({type(tree).__name__})"] if not isinstance(tree, Tensor) and _holds_tensors(tree) else []


def _holds_tensors(obj: Any, depth: int = 3, items: int = 16) -> bool:
    """Whether a tensor is among obj's attributes or the first `items` items of its
    containers, `depth` levels down."""
    if isinstance(obj, Tensor):
        return True
    if depth == 0 or isinstance(obj, (str, bytes, type)):
        return False
    if isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (tuple, list, set, frozenset)):
        values = obj
    else:
        values = getattr(obj, "__dict__", {}).values()
    return any(_holds_tensors(v, depth - 1, items) for v in islice(values, items))


def is_dataclass_instance(node: Any) -> bool:
    return dataclasses.is_dataclass(node) and not isinstance(node, type)


def fields_of(node: Any) -> dict[str, Any]:
    """Name → value of a dataclass instance's fields that hold one (an init=False field
    may never have been set)."""
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if hasattr(node, f.name)}


def with_fields(node: Any, values: dict[str, Any]) -> Any:
    """A shallow copy of dataclass instance `node` with `values` in its fields (frozen ones too)."""
    copied = copy.copy(node)
    for name, value in values.items():
        object.__setattr__(copied, name, value)
    return copied


def map_tensors(fn: Callable[[Tensor, str], Any], tree: Any, name: str = "") -> Any:
    """The structure with fn(tensor, path) in place of every tensor; `path` names it in
    messages (e.g. "output['logits']"). Named tuples, dict subclasses such as Hugging
    Face's ModelOutput and dataclasses keep their type."""
    return _mapped(fn, tree, name)


def _mapped(fn: Callable[[Tensor, str], Any], node: Any, path: str) -> Any:
    # (A function of the module, not a closure calling itself: that would be a reference
    # cycle through `fn`, keeping whatever fn holds, a whole model copy, for the collector.)
    if isinstance(node, Tensor):
        return fn(node, path)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_mapped(fn, v, f"{path}.{f}") for f, v in zip(node._fields, node)))
    if isinstance(node, (tuple, list)):
        return type(node)(_mapped(fn, v, f"{path}[{i}]") for i, v in enumerate(node))
    if isinstance(node, dict):
        mapped = {key: _mapped(fn, v, f"{path}[{key!r}]") for key, v in node.items()}
        if type(node) is dict:
            return mapped
        try:
            return type(node)(**mapped)
        except TypeError:
            return type(node)(mapped)
    if is_dataclass_instance(node):
        return with_fields(node, {name: _mapped(fn, v, f"{path}.{name}") for name, v in fields_of(node).items()})
    return node
