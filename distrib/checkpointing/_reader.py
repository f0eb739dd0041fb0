"""`CheckpointReader`: the only way checkpoint files are read, each checked while it is read.

Every read names a file of the manifest: a file the manifest does not list is refused, and so is a name
that leads outside the checkpoint (a symbolic link). Each file is checked against its manifest entry as
its bytes arrive (size always, CRC-32C unless `verify="size"`), in parallel pieces; tensors go straight
into the destination tensors (the prepared model's parameters) when they fit. A file that fails raises
`CheckpointCorruptError` naming it; by then the destinations read so far may hold its bytes, so load
another checkpoint before training on. Manifests of format version 1 (other checksums) are verified by
reading each file once more. Example (a strategy)::

    def load_training_state(runtime, reader):
        tensors = reader.tensors("model_0.safetensors", destinations=model.state_dict())
        optimizer.load_state_dict(reader.torch_object("optimizer_0.pt", runtime.device))
"""

from __future__ import annotations

import io
import json
import pickle
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointCorruptError
from ._io import Ranges, map_in_threads, read_checked
from ._manifest import CHECKSUM, Verify, expected_crc, inside, verify_by_reading
from ._stfile import SafetensorsFile
from ._tensors import ALIASES_KEY

#: files at least this large are loaded with torch.load(mmap=True) while a thread verifies them
_MMAP_FROM = 64 << 20


def refused_global(error: Exception) -> str | None:
    """The line of a `weights_only` refusal that names the refused global, or None for other errors."""
    text = str(error)
    if "Weights only load failed" not in text and "Unsupported global" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if "global" in line.lower() and line.strip()]
    return (lines[-1] if lines else text.splitlines()[0])[:200]


class CheckpointReader:
    """Reads the files of one checkpoint, each checked against the manifest as it is read."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        *,
        verify: Verify = "checksum",
        weights_only: bool = True,
    ) -> None:
        if verify not in ("checksum", "size"):
            raise ValueError(f"verify={verify!r} must be 'checksum' or 'size'.")
        self.directory = directory
        self.manifest = manifest
        self.files: dict[str, dict[str, Any]] = manifest["files"]
        self.verify = verify
        self.weights_only = weights_only
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    # --- what is there ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return sorted(self.files)

    def path(self, name: str) -> Path:
        """The path of a listed file, inside the checkpoint; refuses anything else."""
        if name not in self.files:
            raise CheckpointCorruptError(
                f"{str(self.directory / name)!r} is not listed in the manifest of {str(self.directory)!r}, so "
                "it cannot be verified and is not loaded. The checkpoint is incomplete or was modified; "
                "restore it or load another checkpoint."
            )
        path = inside(self.directory, name)
        if not path.is_file():
            raise CheckpointCorruptError(
                f"{str(path)!r} is missing (the manifest lists it); restore it or load another checkpoint."
            )
        return path

    # --- reading ----------------------------------------------------------------------------------
    def _crc(self, name: str) -> int | None:
        """The CRC-32C to check while reading; None when the check is by size only or already done."""
        if self.verify == "size":
            return None
        if self.manifest["checksum"] != CHECKSUM:  # format 1: check by reading, once
            self.verified_path(name)
            return None
        return expected_crc(self.manifest, name)

    def bytes(self, name: str) -> bytearray:
        """The whole file, checked."""
        path = self.path(name)
        data = read_checked(path, self.files[name]["size"], self._crc(name), self.directory)
        self._mark(name)
        return data

    def json(self, name: str) -> Any:
        """A JSON file, checked and parsed; a file that does not parse names itself."""
        data = self.bytes(name)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointCorruptError(f"{str(self.directory / name)!r} is not valid JSON: {e}") from e

    def tensors(
        self, name: str, destinations: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """A safetensors file's tensors (tied entries restored as shared); where `destinations` holds a
        fitting CPU tensor under the same name, the bytes are read straight into it."""
        path = self.path(name)
        file = SafetensorsFile(path, self.files[name]["size"])
        tensors = file.read(self._crc(name), destinations)
        self._mark(name)
        try:
            aliases = json.loads(file.metadata.get(ALIASES_KEY, "{}"))
            for alias, source in aliases.items():
                tensors[alias] = tensors[source]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointCorruptError(f"{str(path)!r} has malformed tied-weight metadata: {e!r}") from e
        return tensors

    def torch_object(self, name: str, map_location: Any = "cpu") -> Any:
        """A `torch.save` file, checked, loaded with `weights_only` as the caller of `load_state` chose.
        Large files are memory-mapped while a thread verifies them (one read of the bytes)."""
        path = self.path(name)
        size = self.files[name]["size"]
        if size < _MMAP_FROM:
            return self._torch_load(name, io.BytesIO(self.bytes(name)), map_location, mmap=False)
        crc = self._crc(name)
        ranges = Ranges(path, size, crc, self.directory)
        ranges.skip(size)  # hashes the file in the pool's threads, while torch.load maps it
        try:
            obj = self._torch_load(name, str(path), map_location, mmap=True)
        finally:
            ranges.finish()
        self._mark(name)
        return obj

    def _torch_load(self, name: str, source: Any, map_location: Any, *, mmap: bool) -> Any:
        path = str(self.directory / name)
        try:
            return torch.load(source, map_location=map_location, weights_only=self.weights_only, mmap=mmap)
        except pickle.UnpicklingError as e:
            refused = refused_global(e)
            if not (self.weights_only and refused):
                raise CheckpointCorruptError(f"cannot read {path!r}: {e}") from e
            raise CheckpointCorruptError(
                f"{path!r} holds objects that safe loading (weights_only=True) refuses ({refused}). If you trust "
                "this checkpoint, load it with load_state(..., weights_only=False), which runs pickled code; or "
                "keep such state to tensors and plain Python values."
            ) from e
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointCorruptError(f"cannot read {path!r}: {e}") from e

    def verified_path(self, name: str) -> Path:
        """The path of a listed file after checking all of it (for readers with their own file access)."""
        path = self.path(name)
        with self._lock:
            if name in self._checked:
                return path
        if self.verify == "size" or self.manifest["checksum"] == CHECKSUM:
            size = self.files[name]["size"]
            crc = None if self.verify == "size" else expected_crc(self.manifest, name)
            with Ranges(path, size, crc, self.directory) as ranges:
                ranges.skip(size)
        else:
            verify_by_reading(self.directory, self.manifest, name)
        self._mark(name)
        return path

    def verify_files(self, names: list[str]) -> None:
        """Check the given listed files now, in threads (e.g. files that hooks will read)."""
        list(map_in_threads(self.verified_path, names))

    def hook_files(self) -> list[str]:
        """Files distrib's writers did not record (written by save hooks), checked before the load hooks
        run; with a format-1 manifest, which does not say who wrote what, every file."""
        if self.manifest["checksum"] != CHECKSUM:
            return self.names()
        return [name for name, entry in self.files.items() if entry.get("recorded") is False]

    def _mark(self, name: str) -> None:
        with self._lock:
            self._checked.add(name)
