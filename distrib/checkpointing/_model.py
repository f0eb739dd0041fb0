"""`save_model` (weights for inference and sharing, sharded like HF Hub models) and `save` (one object)."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._runtime import current, current_or_none
from ._files import parse_size, write_atomic
from ._sync import run_on_every_rank
from ._tensors import to_safetensors, write_tensors

_WEIGHTS = {True: ("model", "safetensors"), False: ("pytorch_model", "bin")}


def save_model(
    model: torch.nn.Module,
    save_directory: str | os.PathLike[str],
    max_shard_size: int | str = "10GB",
    safe_serialization: bool = True,
) -> Path:
    """Write the model's unwrapped weights to `save_directory`; call on every rank (sharded strategies
    gather the full weights), rank 0 writes. Returns the directory.

    The weights go to `model.safetensors`, or, above `max_shard_size` (bytes, or a string like "5GB"),
    to `model-00001-of-00003.safetensors`, ... with `model.safetensors.index.json` (`{"metadata":
    {"total_size": ...}, "weight_map": {name: file}}`), the layout of Hugging Face checkpoints. Tied
    weights are stored under each name, so `safetensors.torch.load_file` + `model.load_state_dict` load
    the files as they are. `safe_serialization=False` writes `pytorch_model.bin` with `torch.save`. Each
    file is replaced atomically, the index last; weight files of an earlier save that the new one does
    not use are removed. Example::

        save_model(model, "release/", max_shard_size="2GB")
        state = safetensors.torch.load_file("release/model.safetensors")
        fresh_model.load_state_dict(state)
    """
    runtime = current("save_model")
    directory = Path(save_directory)
    max_bytes = parse_size(max_shard_size)
    state = runtime.strategy_module.full_state_dict(runtime, model)

    def write() -> None:
        if runtime.rank == 0:
            assert state is not None, "a strategy's full_state_dict() must return the state dict on rank 0"
            write_weights(state, directory, max_bytes, safe_serialization)

    run_on_every_rank(runtime, "save_model", write)
    return directory


def get_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The prepared model's complete, unwrapped state dict (unsharded, on the CPU) on the main process, and
    None on the others. Call it on every rank: under FSDP2 and ZeRO-3 the shards are gathered. Example::

        state = get_state_dict(model)
        if state is not None:
            torch.save(state, "weights.pt")
    """
    runtime = current("get_state_dict")
    state = runtime.strategy_module.full_state_dict(runtime, model)
    if runtime.rank != 0:
        return None
    assert state is not None, "a strategy's full_state_dict() must return the state dict on rank 0"
    return {k: v.detach().cpu() for k, v in state.items()}


def write_weights(state: Mapping[str, Any], directory: Path, max_bytes: int, safe: bool) -> list[str]:
    """Write a state dict as one file or as shards plus an index; returns the file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, _ = to_safetensors(state, keep_aliases=False)
    shards = _split(tensors, max_bytes)
    stem, suffix = _WEIGHTS[safe]
    if len(shards) == 1:
        names = [f"{stem}.{suffix}"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        if safe:
            write_atomic(directory / name, functools.partial(save_file, shard, metadata={"format": "pt"}))
        else:
            compact = {k: v.clone() if _is_view(v) else v for k, v in shard.items()}
            write_atomic(directory / name, functools.partial(torch.save, compact))
    index = directory / f"{stem}.{suffix}.index.json"
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        write_atomic(index, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    _remove_stale(directory, keep=set(names) | ({index.name} if len(shards) > 1 else set()))
    return names


def _is_view(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """Remove weight files (either format) of an earlier save that this one did not write, so that a
    loader never picks up stale weights."""
    for stem, suffix in _WEIGHTS.values():
        pattern = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.{suffix}(\.index\.json)?")
        for path in directory.iterdir():
            if pattern.fullmatch(path.name) and path.name not in keep and path.is_file():
                path.unlink()


def save(obj: Any, path: str | os.PathLike[str], safe_serialization: bool = True) -> Path:
    """Write `obj` to `path` once (on the main process), atomically; returns the path.

    A state dict (a mapping of names to tensors) is written with safetensors (read it back with
    `safetensors.torch.load_file`); anything else, or everything with `safe_serialization=False`, with
    `torch.save` (read it back with `torch.load`, which refuses pickled code unless you pass
    `weights_only=False`). Works outside a `distributed()` scope too. Call `wait_for_everyone()` before
    other ranks read the file. Example::

        save(unwrap_model(model).state_dict(), "weights.safetensors")
        save({"epoch": 3, "best_loss": 0.12}, "progress.pt")
    """
    runtime = current_or_none()
    target = Path(path)
    if runtime is not None and not runtime.is_main_process:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if safe_serialization and _is_state_dict(obj):
        write_tensors(target, obj, keep_aliases=False, atomic=True)
    else:
        write_atomic(target, lambda tmp: torch.save(obj, tmp))
    return target


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )
