"""The tracker interface and the value conversion every tracker relies on.

A tracker is any object with a `name` and three methods (`start`, `log`, `finish`); distrib calls them on
the main process only, with plain Python values (tensors already turned into numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Tracker(Protocol):
    """What `init_trackers` needs from a tracker. Subclassing is not required; matching is enough.

    distrib calls `start` once from `init_trackers`, `log` from every `log(...)` call and `finish` from
    `end_training()`, all on the main process only. Values arrive as plain Python: numbers, strings,
    lists and dicts. A tracker may expose the library object it writes through as `writer`, which
    `get_tracker(name, unwrap=True)` returns. Example::

        class PrintTracker:
            name = "print"

            def start(self, project_name, config):
                print("starting", project_name, config)

            def log(self, values, step):
                print(step, values)

            def finish(self):
                print("done")

        init_trackers("demo", trackers=["jsonl", PrintTracker()])
    """

    name: str

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        """Open the run: create files or connect, and record `config` (the hyper-parameters)."""

    def log(self, values: dict[str, Any], step: int | None) -> None:
        """Record one set of values (already plain Python) at `step` (None when not given)."""

    def finish(self) -> None:
        """Flush and close the run."""


def to_python(value: Any) -> Any:
    """Turn tensors and numpy values into Python numbers or lists, recursively through dicts and lists.

    Example: `to_python({"loss": torch.tensor(0.5)})` returns `{"loss": 0.5}`.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.item() if value.numel() == 1 else value.cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(key): to_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(item) for item in value]
    return value


def config_dict(config: Any, caller: str = "init_trackers") -> dict[str, Any]:
    """Hyper-parameters as a plain dict, from a mapping, a dataclass or an `argparse.Namespace`."""
    if config is None:
        return {}
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"{caller}(config=...) takes a dict, a dataclass or an argparse.Namespace of hyper-parameters, "
            f"got {type(config).__name__}."
        )
    converted: dict[str, Any] = to_python(config)
    return converted


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dicts as one level with joined keys: `{"a": {"b": 1}}` becomes `{"a/b": 1}`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def is_number(value: Any) -> bool:
    """True for int and float (and bool, which trackers store as 0/1)."""
    return isinstance(value, (int, float))


class _Discard:
    """Stands in for a writer on ranks that do not track: every method call does nothing."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _discard_call

    def __repr__(self) -> str:
        return "<distrib: tracking happens on the main process only; this call does nothing>"


def _discard_call(*args: Any, **kwargs: Any) -> None:
    return None


class NullTracker:
    """What `get_tracker` returns on processes other than the main one: every call does nothing.

    Its `writer` also swallows any method call, so `get_tracker("tensorboard", unwrap=True).add_histogram(...)`
    can run on every rank and only writes on the main process.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.writer: Any = _Discard()

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        return None

    def log(self, values: dict[str, Any], step: int | None) -> None:
        return None

    def finish(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"NullTracker({self.name!r})"
