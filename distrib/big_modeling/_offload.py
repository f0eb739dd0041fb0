"""The disk-offload format: one raw ``.dat`` file per tensor plus an ``index.json`` of dtypes and shapes.

``folder/index.json`` maps each tensor name to ``{"dtype": "bfloat16", "shape": [4096, 4096]}`` and
``folder/<name>.dat`` holds the tensor's bytes exactly as they lie in memory (C order, native byte
order), so every dtype, bf16 and float8 included, round-trips bit for bit. Files are memory-mapped on
read (`torch.from_file`), so a tensor costs RAM only while it is in use. A folder written by one run is
read by the next: `dispatch_model` takes tensors that are still on the meta device from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError

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
        if index_file.exists():
            try:
                self._index = json.loads(index_file.read_text())
            except ValueError as exc:
                raise CheckpointError(
                    f"offload index {index_file} is not valid JSON ({exc}); delete the folder to rebuild it"
                ) from exc

    def __contains__(self, name: str) -> bool:
        return name in self._index and self._file(name).exists()

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

    def meta(self, name: str) -> torch.Tensor:
        """An empty tensor on the meta device with the stored dtype and shape."""
        entry = self._index[name]
        return torch.empty(_shape(entry), dtype=_dtype(entry), device="meta")

    def load(self, name: str) -> torch.Tensor:
        """The stored tensor, memory-mapped from its file (copy-on-write: edits never reach the file)."""
        if name not in self:
            raise CheckpointError(
                f"tensor {name!r} is not in the offload folder {self.path}; it was never offloaded there, "
                "or the folder was written for another model"
            )
        entry = self._index[name]
        shape, dtype = _shape(entry), _dtype(entry)
        numel = 1
        for dim in shape:
            numel *= dim
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.from_file(str(self._file(name)), shared=False, size=numel, dtype=dtype).view(shape)

    def flush(self) -> None:
        """Write ``index.json`` (atomically, so a crash never leaves half an index)."""
        tmp = self.path / f".{INDEX_NAME}.tmp"
        tmp.write_text(json.dumps(self._index, indent=1, sort_keys=True))
        tmp.replace(self.path / INDEX_NAME)


def _shape(entry: dict[str, object]) -> list[int]:
    shape = entry["shape"]
    assert isinstance(shape, list)
    return [int(dim) for dim in shape]


def _dtype(entry: dict[str, object]) -> torch.dtype:
    dtype = getattr(torch, str(entry["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"offload index names an unknown dtype {entry['dtype']!r}")
    return dtype
