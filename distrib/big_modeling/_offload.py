"""The disk-offload format: an ``index.json`` of tensors, each a raw ``.dat`` file or a link into a checkpoint.

``folder/index.json`` maps each tensor name to ``{"dtype": "bfloat16", "shape": [4096, 4096]}`` and
``folder/<name>.dat`` holds the tensor's bytes exactly as they lie in memory (C order, native byte
order), so every dtype, bf16 and float8 included, round-trips bit for bit. A tensor that a safetensors
checkpoint already holds in the right dtype is not copied: its entry links to it instead,
``{"dtype": ..., "shape": ..., "safetensors_file": "/abs/model-00002.safetensors", "key": "h.3.mlp.c_fc.weight"}``.
Either way tensors are memory-mapped on read, so a tensor costs RAM only while it is in use. A folder
written by one run is read by the next: `dispatch_model` takes tensors still on the meta device from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from ._mapped import Extent, map_tensors, read_header

INDEX_NAME = "index.json"


class OffloadFolder:
    """A folder of offloaded tensors. Example::

    folder = OffloadFolder("offload/")
    folder.save("head.weight", torch.randn(4, 4, dtype=torch.bfloat16))
    folder.flush()
    OffloadFolder("offload/").load("head.weight")  # memory-mapped, bit-identical
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        index_file = self.path / INDEX_NAME
        self._index: dict[str, dict[str, object]] = {}
        self._headers: dict[Path, dict[str, Extent]] = {}
        self._extents: dict[str, tuple[Path, Extent]] = {}  # resolved once: streaming reads them every step
        self._linked: dict[Path, tuple[object, object]] = {}  # checkpoint file -> (size, mtime) when linked
        if index_file.exists():
            try:
                self._index = json.loads(index_file.read_text())
            except ValueError as exc:
                raise CheckpointError(
                    f"offload index {index_file} is not valid JSON ({exc}); delete the folder to rebuild it"
                ) from exc

    def __contains__(self, name: str) -> bool:
        return name in self._index and self._where(name)[0].exists()

    def _where(self, name: str) -> tuple[Path, str | None]:
        """The file that holds ``name`` and, for a link into a safetensors checkpoint, its key there."""
        entry = self._index[name]
        if "safetensors_file" in entry:
            return Path(str(entry["safetensors_file"])), str(entry.get("key", name))
        return self._file(name), None

    def _file(self, name: str) -> Path:
        if "/" in name or os.sep in name or name.startswith("."):
            raise CheckpointError(
                f"cannot offload a tensor named {name!r}: names must not hold path separators"
            )
        return self.path / f"{name}.dat"

    def save(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s raw bytes to ``<name>.dat`` and record its dtype and shape."""
        value = tensor.detach().to("cpu").contiguous()
        file = self._file(name)
        tmp = file.with_name(f".{file.name}.tmp")
        value.reshape(-1).view(torch.uint8).numpy().tofile(tmp)
        tmp.replace(file)  # a new file: tensors mapped from the old one stay valid
        self._index[name] = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
        self._extents.pop(name, None)

    def link(self, name: str, checkpoint_file: Path, key: str, dtype: torch.dtype, shape: torch.Size) -> None:
        """Record that ``name`` is tensor ``key`` of the safetensors ``checkpoint_file``: nothing is copied."""
        stat = checkpoint_file.stat()
        self._index[name] = {
            "dtype": str(dtype).removeprefix("torch."),
            "shape": list(shape),
            "safetensors_file": str(Path(checkpoint_file).resolve()),
            "key": key,
            "file_size": stat.st_size,
            "file_mtime_ns": stat.st_mtime_ns,
        }
        self._extents.pop(name, None)
        stale = self._file(name)
        if stale.exists():
            stale.unlink()  # a copy left by an earlier run

    def meta(self, name: str) -> torch.Tensor:
        """An empty tensor on the meta device with the stored dtype and shape."""
        entry = self._index[name]
        return torch.empty(_shape(entry), dtype=_dtype(entry), device="meta")

    def load(self, name: str) -> torch.Tensor:
        """The stored tensor, memory-mapped from its file (copy-on-write: edits never reach the file)."""
        return self.load_many([name])[0]

    def load_many(self, names: list[str]) -> list[torch.Tensor]:
        """Several stored tensors, with one memory map per file they lie in."""
        by_file: dict[Path, list[tuple[int, Extent]]] = {}
        for position, name in enumerate(names):
            found = self._extents.get(name)
            if found is None:
                found = self._extents[name] = self._extent(name)
            by_file.setdefault(found[0], []).append((position, found[1]))
        tensors: list[torch.Tensor | None] = [None] * len(names)
        for path, items in by_file.items():
            if path in self._linked:
                _check_unchanged(path, self._linked[path], self.path)
            for (position, _), tensor in zip(items, map_tensors(path, [e for _, e in items])):
                tensors[position] = tensor
        return tensors  # type: ignore[return-value]

    def _extent(self, name: str) -> tuple[Path, Extent]:
        if name not in self:
            where = self._where(name)[0] if name in self._index else None
            because = f" (its file {where} is gone)" if where is not None else ""
            raise CheckpointError(
                f"tensor {name!r} is not in the offload folder {self.path}{because}; it was never offloaded "
                "there, the folder was written for another model, or the checkpoint it links to was moved"
            )
        entry = self._index[name]
        shape, dtype = tuple(_shape(entry)), _dtype(entry)
        path, key = self._where(name)
        if key is None:
            return path, Extent(0, dtype.itemsize * _numel(shape), dtype, shape)
        if "file_size" in entry:
            self._linked[path] = (entry["file_size"], entry.get("file_mtime_ns"))
            _check_unchanged(path, self._linked[path], self.path)
        header = self._headers.get(path)
        if header is None:
            header = self._headers[path] = read_header(path)
        extent = header.get(key)
        if extent is None or extent.dtype != dtype or extent.shape != shape:
            raise CheckpointError(
                f"{path} no longer holds {key!r} as {dtype} {list(shape)} (offload folder {self.path}); "
                "the checkpoint changed since it was loaded: load it again"
            )
        return path, extent

    def flush(self) -> None:
        """Write ``index.json`` (atomically, so a crash never leaves half an index)."""
        tmp = self.path / f".{INDEX_NAME}.tmp"
        tmp.write_text(json.dumps(self._index, indent=1, sort_keys=True))
        tmp.replace(self.path / INDEX_NAME)


def _check_unchanged(path: Path, recorded: tuple[object, object], folder: Path) -> None:
    """A linked checkpoint file must be the one that was linked: a rewritten file would feed wrong weights."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint file {path} is gone (offload folder {folder}): {exc}; load the model again"
        ) from exc
    if (stat.st_size, stat.st_mtime_ns) != recorded:
        raise CheckpointError(
            f"checkpoint file {path} changed after the model was loaded from it (offload folder {folder}); "
            "its offloaded layers would be read from the new contents. Load the model again "
            "(load_checkpoint_and_dispatch), and do not overwrite a checkpoint while a model reads from it"
        )


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def _shape(entry: dict[str, object]) -> list[int]:
    shape = entry["shape"]
    assert isinstance(shape, list)
    return [int(dim) for dim in shape]


def _dtype(entry: dict[str, object]) -> torch.dtype:
    dtype = getattr(torch, str(entry["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"offload index names an unknown dtype {entry['dtype']!r}")
    return dtype
