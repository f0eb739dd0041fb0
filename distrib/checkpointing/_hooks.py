"""Extending checkpoints: objects registered for checkpointing, and pre-save / pre-load hooks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._runtime import current
from ..errors import CheckpointError

#: A hook receives the run's prepared models and the checkpoint directory.
Hook = Callable[[list[torch.nn.Module], Path], None]


class HookHandle:
    """Returned by the `register_*_hook` functions; `handle.remove()` unregisters the hook."""

    def __init__(self, hooks: list[Any], hook: Any) -> None:
        self._hooks = hooks
        self._hook = hook

    def remove(self) -> None:
        """Unregister the hook (removing it twice is harmless)."""
        if any(h is self._hook for h in self._hooks):
            self._hooks[:] = [h for h in self._hooks if h is not self._hook]

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _check_hook(caller: str, fn: Any) -> None:
    if not callable(fn):
        raise CheckpointError(f"{caller}() needs a function fn(models, directory), got {type(fn).__name__}.")


def register_save_state_pre_hook(fn: Hook) -> HookHandle:
    """Call `fn(models, directory)` on every rank during `save_state`, before distrib writes its files.

    `models` are the prepared models, `directory` the checkpoint's temporary directory: files the hook
    writes there become part of the checkpoint (listed in its manifest, renamed into place with it). Use
    `is_main_process()` inside to write once. Returns a handle; `handle.remove()` unregisters. Example::

        def save_config(models, directory):
            if is_main_process():
                (directory / "config.json").write_text(json.dumps(config))

        handle = register_save_state_pre_hook(save_config)
    """
    _check_hook("register_save_state_pre_hook", fn)
    hooks = current("register_save_state_pre_hook").state.save_hooks
    hooks.append(fn)
    return HookHandle(hooks, fn)


def register_load_state_pre_hook(fn: Hook) -> HookHandle:
    """Call `fn(models, directory)` on every rank during `load_state`, after the checkpoint was verified
    and before distrib loads its files, with the checkpoint's directory. Returns a handle. Example::

        def load_config(models, directory):
            config.update(json.loads((directory / "config.json").read_text()))

        register_load_state_pre_hook(load_config)
    """
    _check_hook("register_load_state_pre_hook", fn)
    hooks = current("register_load_state_pre_hook").state.load_hooks
    hooks.append(fn)
    return HookHandle(hooks, fn)


def register_for_checkpointing(*objects: Any) -> None:
    """Include objects in every `save_state` / `load_state`; each needs `state_dict()` and
    `load_state_dict(state)`. They are restored in registration order. Example::

        class Counter:
            def __init__(self): self.seen = 0
            def state_dict(self): return {"seen": self.seen}
            def load_state_dict(self, state): self.seen = state["seen"]

        register_for_checkpointing(counter, ema_model)
    """
    state = current("register_for_checkpointing").state
    for obj in objects:
        missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
        if missing:
            raise CheckpointError(
                f"register_for_checkpointing() got a {type(obj).__name__} without "
                f"{' and '.join(f'a {m}() method' for m in missing)}; checkpointed objects need "
                "state_dict() and load_state_dict(state)."
            )
    state.custom_objects.extend(objects)
