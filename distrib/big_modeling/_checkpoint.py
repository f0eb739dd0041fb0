"""Reading checkpoints one tensor at a time: a safetensors file, a sharded folder with its index, or .bin.

Accepted layouts::

    model.safetensors                               one file
    folder/model.safetensors.index.json + shards    {"weight_map": {"name": "model-00001-of-00002.safetensors"}}
    folder/<anything>.index.json + shards           the same, or the flat form {"name": "shard-file", ...}
    pytorch_model.bin  (or .pt / .pth)              torch.save(state_dict), read with mmap=True (legacy
                                                    non-zip files without mmap), always weights_only=True
    folder/pytorch_model.bin.index.json + shards    the same index formats, for .bin shards
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ._placement import shorten

_FOLDER_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Shard:
    """One checkpoint file and the keys to read from it (None: every key it holds)."""

    path: Path
    keys: tuple[str, ...] | None = None

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"

    @property
    def is_mapped(self) -> bool:
        """True when tensors read from this file are views of a memory map (not copies in RAM)."""
        return self.is_safetensors or zipfile.is_zipfile(self.path)

    def list_keys(self) -> list[str]:
        if self.keys is not None:
            return list(self.keys)
        if self.is_safetensors:
            with safe_open(str(self.path), framework="pt") as handle:
                return list(handle.keys())
        return list(_torch_load(self.path))

    def tensors(self, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for the wanted keys, one at a time, read lazily from the file."""
        if self.is_safetensors:
            with safe_open(str(self.path), framework="pt") as handle:
                for key in self._selected(list(handle.keys()), wanted):
                    yield key, handle.get_tensor(key)
            return
        state = _torch_load(self.path)
        for key in self._selected(list(state), wanted):
            yield key, state.pop(key)
        del state

    def _selected(self, present: list[str], wanted: set[str]) -> list[str]:
        keys = [key for key in (self.keys if self.keys is not None else present) if key in wanted]
        held = set(present)
        for key in keys:
            if key not in held:
                raise _not_in_shard(key, self.path)
        return keys


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: its shards in reading order and shard files its index does not list."""

    source: Path
    shards: list[Shard]
    unlisted: list[str] = field(default_factory=list)

    def keys(self) -> list[str]:
        return [key for shard in self.shards for key in shard.list_keys()]

    def tensors(self, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for shard in self.shards:
            yield from shard.tensors(wanted)


def _not_in_shard(key: str, path: Path) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint index says {key!r} is in {path.name}, but that file does not hold it; "
        "the index and the shards are from different saves: regenerate the index or re-download the shards"
    )


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    # torch can memory-map only the zip format (torch >= 1.6); files in the legacy format are read whole.
    # Either way weights_only=True: nothing in the file is unpickled beyond tensors and plain containers.
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for unreadable files
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def open_checkpoint(checkpoint: str | os.PathLike[str]) -> Checkpoint:
    """Resolve a checkpoint path (file, index file or folder) into its shards, checking they exist."""
    path = Path(checkpoint)
    if path.is_dir():
        path = _find_in_folder(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.name.endswith(".index.json"):
        return _open_index(path)
    if path.suffix == ".safetensors" or path.suffix in _TORCH_SUFFIXES:
        return Checkpoint(path, [Shard(path)])
    raise CheckpointError(
        f"checkpoint {str(path)!r} is not a format distrib reads; give a .safetensors file, a .bin/.pt "
        "file, a *.index.json file, or a folder holding one of them"
    )


def _find_in_folder(folder: Path) -> Path:
    for name in _FOLDER_NAMES:
        if (folder / name).exists():
            return folder / name
    for pattern in ("*.safetensors.index.json", "*.bin.index.json", "*.index.json", "*.safetensors"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(
                f"folder {str(folder)!r} holds several checkpoints ({shorten([p.name for p in found])}); "
                "pass the file or index to load instead of the folder"
            )
    raise CheckpointError(
        f"found no checkpoint in folder {str(folder)!r}; expected one of {', '.join(_FOLDER_NAMES)}, "
        "an *.index.json file, or a single *.safetensors file"
    )


def _read_weight_map(index_file: Path) -> dict[str, str]:
    """``{tensor: file}`` from transformers' ``{"weight_map": {...}}`` layout or from the flat form."""
    try:
        data = json.loads(index_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_file} is not valid JSON ({exc}); regenerate the index") from exc
    weight_map = data.get("weight_map", data) if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_file} is not a checkpoint index: expected JSON mapping each tensor name to its shard "
            'file, either {"weight_map": {"name": "file", ...}} or flat {"name": "file", ...}'
        )
    for file_name in set(weight_map.values()):
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            raise CheckpointError(
                f"{index_file} names the shard {file_name!r}, outside the index's folder; "
                "shard files must be named relative to the folder that holds the index"
            )
    return weight_map


def _open_index(index_file: Path) -> Checkpoint:
    weight_map = _read_weight_map(index_file)
    by_file: dict[str, list[str]] = {}
    for key, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(key)
    folder = index_file.parent
    missing = [name for name in by_file if not (folder / name).exists()]
    if missing:
        raise CheckpointError(
            f"the index {index_file.name} lists shard files missing from {str(folder)!r}: {shorten(missing)}; "
            "finish the download or copy, or regenerate the index"
        )
    suffixes = {Path(name).suffix for name in by_file} or {".safetensors"}
    unlisted = sorted(
        p.name for suffix in suffixes for p in folder.glob(f"*{suffix}") if p.name not in by_file
    )
    shards = [Shard(folder / name, tuple(keys)) for name, keys in sorted(by_file.items())]
    return Checkpoint(index_file, shards, unlisted)
