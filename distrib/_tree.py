"""Map functions over nested structures (dicts, lists, tuples, named tuples, mapping types like HF batches)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def tree_map(fn: Callable[[Any], Any], obj: Any, *, leaf: type | tuple[type, ...] = torch.Tensor) -> Any:
    """Apply `fn` to every leaf of type `leaf`; other leaves are returned unchanged."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: tree_map(fn, v, leaf=leaf) for k, v in obj.items()}
        try:
            return type(obj)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(tree_map(fn, v, leaf=leaf) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, v, leaf=leaf) for v in obj)
    return obj


def leaves(obj: Any, *, leaf: type | tuple[type, ...] = torch.Tensor) -> list[Any]:
    """Every leaf of type `leaf`, depth first, in the order `tree_map` visits them."""
    found: list[Any] = []

    def visit(x: Any) -> Any:
        found.append(x)
        return x

    tree_map(visit, obj, leaf=leaf)
    return found


def replace_leaves(obj: Any, new: list[Any], *, leaf: type | tuple[type, ...] = torch.Tensor) -> Any:
    """`obj` with its leaves replaced, in order, by the items of `new`."""
    it = iter(new)
    return tree_map(lambda _: next(it), obj, leaf=leaf)


def send_to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor (and every object with a `.to(device)`, such as HF batches) to `device`."""
    if hasattr(obj, "to") and not isinstance(obj, (torch.Tensor, torch.nn.Module)) and callable(obj.to):
        try:
            return obj.to(device, non_blocking=non_blocking)
        except TypeError:
            return obj.to(device)
    return tree_map(lambda t: t.to(device, non_blocking=non_blocking), obj)
