"""torch.distributed.checkpoint (DCP) with distrib's guarantees: checksummed writes, verified and safe reads.

DCP keeps its own planners (each rank writes its shards, loads reshard to any world size); only its file
access changes. `StorageWriter` writes every file through a `DurableFile` (size and CRC-32C recorded as the
bytes are written, one fsync per file). `StorageReader` opens only files the manifest lists, verifies
each before DCP reads it, and reads DCP's `.metadata` with an unpickler that accepts nothing but DCP's own
metadata classes (DCP itself unpickles it without restriction). `SafeLoadPlanner` reads non-tensor values
with `torch.load(weights_only=True)` unless the caller of `load_state` opted out (DCP's default planner
unpickles them).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem

from ..errors import CheckpointCorruptError
from ._io import DurableFile, Ledger
from ._reader import refused_global

if TYPE_CHECKING:
    from ._reader import CheckpointReader


class _LedgerFileSystem(FileSystem):
    """DCP's local file system, writing through `DurableFile`s recorded in a ledger."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger
        self._renames: dict[str, str] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with DurableFile(Path(path), self.ledger, defer_sync=True) as stream:
            yield stream

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        os.replace(path, new_path)
        self.ledger.rename(Path(path), Path(new_path))


def storage_writer(directory: Path, ledger: Ledger) -> FileSystemWriter:
    """A DCP writer into `directory` whose files are recorded in `ledger` (DCP's own fsyncs are off: each
    `DurableFile` fsyncs once when it closes)."""
    writer = FileSystemWriter(
        str(directory), sync_files=False, cache_staged_state_dict=torch.cuda.is_available()
    )
    writer.fs = _LedgerFileSystem(ledger)
    return writer


class _CheckedFileSystem(FileSystem):
    """DCP's local file system for reading: only listed files, each verified before it is opened."""

    def __init__(self, reader: CheckpointReader) -> None:
        super().__init__()
        self.reader = reader

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if "r" not in mode or "+" in mode:
            raise CheckpointCorruptError(
                f"a checkpoint being loaded is read-only (DCP opened {str(path)!r} as {mode!r})."
            )
        name = Path(path).relative_to(self.reader.directory).as_posix()
        with open(self.reader.verified_path(name), "rb") as stream:
            yield stream


_METADATA = "torch.distributed.checkpoint.metadata"
#: every global DCP's `.metadata` pickles (dataclasses, enums and names of torch's types); nothing callable
#: with side effects
_ALLOWED = {
    *(
        (_METADATA, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _ALLOWED and not dtype:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


class StorageReader(FileSystemReader):
    """A DCP reader of a verified distrib checkpoint."""

    def __init__(self, reader: CheckpointReader) -> None:
        super().__init__(str(reader.directory))
        self.fs = _CheckedFileSystem(reader)
        self.checkpoint = reader
        self._metadata: Any = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """DCP's metadata, verified and safely unpickled (once: call it before `dcp.load`, so that a bad
        file raises its own error rather than DCP's summary of it)."""
        if self._metadata is None:
            self._metadata = self._read_metadata()
        return self._metadata

    def _read_metadata(self) -> Any:
        path = self.checkpoint.verified_path(".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
            raise CheckpointCorruptError(
                f"{str(path)!r} is not DCP metadata that loads safely ({e}); restore it or load another checkpoint."
            ) from e
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        if not isinstance(metadata, Metadata):
            raise CheckpointCorruptError(f"{str(path)!r} does not hold DCP metadata.")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values with `weights_only` as asked."""

    def __init__(self, weights_only: bool) -> None:
        super().__init__()
        self.weights_only = weights_only

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=self.weights_only)
        except pickle.UnpicklingError as e:
            raise CheckpointCorruptError(
                f"a value in the DCP checkpoint ({read_item.dest_index.fqn}) holds objects that safe loading "
                f"(weights_only=True) refuses ({refused_global(e) or e}). If you trust this checkpoint, load it "
                "with load_state(..., weights_only=False), which runs pickled code."
            ) from e
        # what DefaultLoadPlanner.load_bytes does with the value it unpickled
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
