"""The process group's key-value store as a side channel between ranks.

Used where a collective cannot be: to say why a rank left the run, to count the ranks the stall watchdog
finds idle, and to collect every rank's stall dump on rank 0. Keys live under the default group's own
prefix (every group, scope and restart attempt has one), so runs never read each other's keys. Every
function here is best effort: a store that is gone (its host rank exited) gives None or False, never
an exception, because the callers are already reporting a failure.
"""

from __future__ import annotations

import json
from typing import Any

import torch.distributed as dist

PREFIX = "distrib/"


def group_store() -> Any:
    """The default process group's store, or None when there is no group."""
    try:
        if not dist.is_available() or not dist.is_initialized():
            return None
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def put(store: Any, key: str, value: Any) -> bool:
    """Store `value` as JSON under `key`; False when the store cannot be reached."""
    if store is None:
        return False
    try:
        store.set(PREFIX + key, json.dumps(value, default=str))
    except Exception:
        return False
    return True


def get(store: Any, key: str) -> Any:
    """The JSON value under `key`, or None when it is not there (never waits for it)."""
    if store is None:
        return None
    try:
        if not store.check([PREFIX + key]):
            return None
        return json.loads(store.get(PREFIX + key))
    except Exception:
        return None


def get_many(store: Any, keys: list[str]) -> dict[str, Any]:
    """The values of those `keys` that exist."""
    found = {}
    for key in keys:
        value = get(store, key)
        if value is not None:
            found[key] = value
    return found


def add(store: Any, key: str, amount: int) -> int | None:
    """Add to a counter and return its new value (amount 0 reads it); None when unreachable."""
    if store is None:
        return None
    try:
        return int(store.add(PREFIX + key, amount))
    except Exception:
        return None


def exists(store: Any, key: str) -> bool:
    if store is None:
        return False
    try:
        return bool(store.check([PREFIX + key]))
    except Exception:
        return False
