"""State dicts to and from safetensors files, with tied (shared) tensors handled.

safetensors refuses tensors that share memory. Tied weights (an embedding reused as the output layer) are
stored once and recorded as aliases in the file's metadata (`CheckpointReader.tensors` restores them), or, for files
meant for other tools, stored as separate copies so that `load_file` + `load_state_dict` just works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ._files import write_atomic

if TYPE_CHECKING:
    from .._runtime import Runtime

ALIASES_KEY = "distrib.aliases"


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def to_safetensors(
    state_dict: Mapping[str, Any],
    *,
    keep_aliases: bool = True,
    copy: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU tensors that safetensors accepts, plus `{name: earlier_name}` for tied entries.

    Entries that are the very same view of the same memory become aliases (when `keep_aliases`), other
    overlapping or non-contiguous tensors are copied. With `copy(name, tensor)`, every tensor is taken
    through it (a snapshot into buffers of its own) instead of moved to the CPU. Example::

        tensors, aliases = to_safetensors(model.state_dict())
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, int]] = set()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"state dict entry {name!r} is a {type(value).__name__}, not a tensor; safetensors files "
                "hold tensors only."
            )
        t = value.detach()
        if t.numel() == 0:
            tensors[name] = t.to("cpu").contiguous()
            continue
        key = _view_key(t)
        if keep_aliases and key in views:
            aliases[name] = views[key]
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        shared = storage in storages
        views.setdefault(key, name)
        storages.add(storage)
        if copy is not None:
            tensors[name] = copy(name, t)
            continue
        t = t.to("cpu")
        tensors[name] = t.clone() if shared else t.contiguous()
    return tensors, aliases


def write_tensors(
    path: Path,
    state_dict: Mapping[str, Any],
    *,
    keep_aliases: bool = True,
    metadata: dict[str, str] | None = None,
    atomic: bool = False,
) -> None:
    """Write a state dict to `path` as safetensors; with `atomic=True` through a temporary file that
    replaces `path` only once complete (not needed inside a checkpoint's temporary directory). Example::

    write_tensors(directory / "model_0.safetensors", model.state_dict())
    """
    tensors, aliases = to_safetensors(state_dict, keep_aliases=keep_aliases)
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases)
    if atomic:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    else:
        save_file(tensors, str(path), metadata=meta)


def unwrapped(runtime: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside the strategy's wrapper (and torch.compile's)."""
    inner = runtime.strategy_module.unwrap_model(model)
    return getattr(inner, "_orig_mod", inner)  # type: ignore[no-any-return]
