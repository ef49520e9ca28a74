"""Walking the nested tuples, lists and dicts that modules take and return."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch import Tensor


def tensors_in(tree: Any) -> Iterator[Tensor]:
    """Every tensor of a nested structure of tuples, lists and dicts, depth first."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from tensors_in(v)
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors_in(v)


def map_tensors(fn: Callable[[Tensor, str], Any], tree: Any, name: str = "") -> Any:
    """The structure with fn(tensor, path) in place of every tensor; `path` names it in
    messages (e.g. "output['logits']"). Named tuples and dict subclasses such as Hugging
    Face's ModelOutput keep their type."""
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
    return node
