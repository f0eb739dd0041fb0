"""Debug mode (`debug_collectives=True`): user code's torch.distributed calls join the collective ledger.

While a scope in debug mode is open, the collective functions of the `torch.distributed` module
(`all_reduce`, `all_gather`, `broadcast`, `barrier`, ...) are wrapped: a call made from your code (not
from torch, DeepSpeed or distrib's own protocol) on the default group first runs the same header
exchange as distrib's own collectives (op, call site, shapes and dtypes of every tensor argument,
`src`/`dst`/`op` arguments), so a rank that calls `dist.all_reduce` where another calls
`dist.broadcast`, or with another shape, raises `CollectiveMismatchError` on every rank with the table.
distrib's own collectives then also use that exchange on every call (no fast path).

Cost: one extra small all-gather per checked call (a gloo collective takes 0.3-0.9 ms on the project's
CPU machines: an evaluation loop with one gather per batch ran at 1.6-1.7x the hand-written loop's time,
see benchmarks/bench_gather.py), plus about 20 µs of Python. Not checked: calls on other
groups (`group=`), point-to-point calls, and functions imported before the scope opened
(`from torch.distributed import all_reduce` keeps the unwrapped function).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from ._agreement import Collective, Header
from ._ledger import OTHER, call_site, describe_row
from ._runtime import current_or_none

NAMES = (
    "all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "all_gather_object",
    "broadcast", "broadcast_object_list", "reduce", "gather", "gather_object", "scatter",
    "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "all_to_all", "all_to_all_single", "barrier",
)  # fmt: skip
_ARGUMENTS = ("src", "dst", "op", "group_src", "group_dst")


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.abspath(next(iter(spec.submodule_search_locations))) + os.sep


_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_UNCHECKED = tuple(
    p
    for p in (
        _package_dir("torch"),
        _package_dir("deepspeed"),
        _HERE + "_agreement.py",
        _HERE + "_exchange.py",
        _HERE + "_debug_collectives.py",
    )
    if p
)
_originals: dict[str, Any] = {}
_users = 0


def install() -> None:
    """Wrap torch.distributed's collectives (once, however many debug scopes are open)."""
    global _users
    _users += 1
    if _users > 1:
        return
    for name in NAMES:
        original = getattr(dist, name, None)
        if original is not None:
            _originals[name] = original
            setattr(dist, name, _checked(name, original))


def uninstall() -> None:
    global _users
    _users = max(0, _users - 1)
    if _users:
        return
    for name, original in _originals.items():
        setattr(dist, name, original)
    _originals.clear()


def _checked(name: str, original: Any) -> Any:
    signature = inspect.signature(original)
    op = f"torch.distributed.{name}"

    @functools.wraps(original)
    def checked(*args: Any, **kwargs: Any) -> Any:
        runtime = current_or_none()
        caller = sys._getframe(1).f_code.co_filename
        if runtime is None or not runtime.settings.debug_collectives or runtime.world_size == 1:
            return original(*args, **kwargs)
        if os.path.abspath(caller).startswith(_UNCHECKED):
            return original(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs).arguments
        group = bound.get("group")
        if group is not None and group is not dist.group.WORLD:
            return original(*args, **kwargs)
        leaves = [t for value in bound.values() for t in _tensors(value)]
        extra = tuple((k, str(bound[k])) for k in _ARGUMENTS if k in bound and bound[k] is not None)
        with Collective(
            runtime,
            op,
            call_site(1),
            leaves,
            OTHER,
            extra=extra,
            payload=False,
            policy="never",
            compatible=_same,
        ):
            return original(*args, **kwargs)

    return checked


def _same(headers: list[Header]) -> str | None:
    """torch's collectives need the same tensor shapes and dtypes on every rank."""
    if all(h.key == headers[0].key for h in headers):
        return None
    listed = "; ".join(
        f"rank {r}: {', '.join(describe_row(*t) for t in h.tensors) or 'no tensors'}"
        for r, h in enumerate(headers)
    )
    return f"the ranks passed tensors of different shapes or dtypes ({listed})"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []
