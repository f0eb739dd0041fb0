"""`CheckpointWriter`: what every part of a checkpoint (strategies, objects, random states, extensions)
writes through.

A synchronous save writes each file as soon as it is given, straight from the live tensors. A background
save takes a snapshot instead: tensors are copied into CPU buffers that are reused from one save to the
next (pinned memory for CUDA tensors, copied without blocking the device), small values are serialized at
once, and the files are written later, in the background, by `finish()`. Either way every file goes
through a `DurableFile`, so its size and CRC-32C are known without reading it back. Example (a strategy)::

    def save_training_state(runtime, writer):
        if runtime.rank == 0:
            writer.tensors("model_0.safetensors", model.state_dict())
            writer.torch_object("optimizer_0.pt", optimizer.state_dict())
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import json
import pickle
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ._io import PIECE, DurableFile, Ledger, pool
from ._stfile import write_safetensors
from ._tensors import ALIASES_KEY, to_safetensors


class Snapshots:
    """CPU copies of tensors for background saves, in buffers kept for the next save of the same shapes.

    CPU-to-CPU copies are plain `memmove`s of pieces, spread over the I/O threads: torch's `copy_` wakes
    its OpenMP threads for every tensor, which costs milliseconds each on a busy machine (measured: 48
    tensors of 4 MB took 0.34-0.56 s with `copy_`, 0.03-0.05 s with `memmove`)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._used: set[tuple[str, str]] = set()
        self._pending: list[tuple[Future[Any], torch.Tensor]] = []
        self.device_copies = False

    def copy(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        """A CPU copy of `t` (in the buffer kept under `key` when it fits)."""
        t = t.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype or key in self._used:
            pin = t.device.type == "cuda"
            buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            if key not in self._used:
                self._buffers[key] = buffer
        self._used.add(key)
        if t.device.type == "cpu" and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
            self._memmove(buffer, t)
        elif t.device.type == "cpu":
            buffer.copy_(t)
        else:
            buffer.copy_(t, non_blocking=True)
            self.device_copies = True
        return buffer

    def structure(self, file: str, obj: Any, path: str = "") -> Any:
        """`obj` (dicts, lists, tuples of tensors and plain values) with every tensor copied."""
        if isinstance(obj, torch.Tensor):
            return self.copy((file, path), obj)
        if isinstance(obj, Mapping):
            return type(obj)({k: self.structure(file, v, f"{path}/{k}") for k, v in obj.items()})  # type: ignore[call-arg]
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self.structure(file, v, f"{path}/{i}") for i, v in enumerate(obj))
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            return obj
        try:  # any other value may change after the call returns: the snapshot keeps a copy
            return copy.deepcopy(obj)
        except Exception:  # not copyable (a lambda, a lock): torch.save will name the file if it fails too
            return obj

    def _memmove(self, buffer: torch.Tensor, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        dst, src = buffer.data_ptr(), t.data_ptr()
        for start in range(0, nbytes, PIECE):
            n = min(PIECE, nbytes - start)
            self._pending.append((pool().submit(ctypes.memmove, dst + start, src + start, n), t))

    def settle(self) -> Callable[[], None]:
        """Call once the snapshot is complete: waits for the CPU copies, and returns a function that waits
        (in the writing thread) until the device-to-host copies have landed. Buffers become reusable for
        the next save."""
        pending, self._pending = self._pending, []
        for future, _ in pending:
            future.result()
        self._used.clear()
        if not self.device_copies:
            return lambda: None
        self.device_copies = False
        event = torch.cuda.Event()
        event.record()
        return event.synchronize


class CheckpointWriter:
    """Writes the files of one checkpoint on one rank (now, or at `finish()` for a background save)."""

    def __init__(
        self,
        directory: Path,
        rank: int,
        *,
        snapshots: Snapshots | None = None,
        process_group: Any = None,
        final: Path | None = None,
    ) -> None:
        self.directory = directory
        self.rank = rank
        self.background = snapshots is not None
        #: the group a background save's collectives use (None: the default group, or one process)
        self.process_group = process_group
        self.ledger = Ledger(directory, rank, final, parallel=snapshots is None)
        self._snapshots = snapshots
        self._jobs: list[Callable[[], None]] = []
        self._settled: Callable[[], None] = lambda: None

    def path(self, name: str) -> Path:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def tensors(
        self, name: str, state_dict: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None
    ) -> None:
        """A safetensors file of a state dict (tied entries stored once, restored by the reader)."""
        copy = None
        if self._snapshots is not None:
            snapshots = self._snapshots
            copy = lambda key, t: snapshots.copy((name, key), t)  # noqa: E731
        tensors, aliases = to_safetensors(state_dict, copy=copy)
        meta = {"format": "pt", **(metadata or {})}
        if aliases:
            meta[ALIASES_KEY] = json.dumps(aliases)
        self._do(lambda: write_safetensors(self.path(name), tensors, meta, self.ledger, defer_sync=True))

    def torch_object(self, name: str, obj: Any, *, small: bool = False) -> None:
        """A `torch.save` file (read back with `weights_only=True` unless the user opts out). A background
        save copies the tensors of `obj` into its snapshot, or, for `small` objects (schedulers, user
        objects, which may hold any mutable value), serializes the whole object at once."""
        if self._snapshots is not None and small:
            self.raw(name, torch_bytes(obj))
            return
        if self._snapshots is not None:
            obj = self._snapshots.structure(name, obj)
        self._do(lambda: save_torch(obj, self.stream(name)))

    def json(self, name: str, value: Any) -> None:
        """A JSON file; the value is encoded now."""
        self.raw(name, json.dumps(value, indent=1).encode("utf-8"))

    def raw(self, name: str, data: bytes) -> None:
        """A file of the given bytes."""

        def write() -> None:
            with self.stream(name) as f:
                f.write(data)

        self._do(write)

    def stream(self, name: str) -> DurableFile:
        """A new file to write into now (for writers with their own format, e.g. DCP and DeepSpeed)."""
        return DurableFile(self.path(name), self.ledger, defer_sync=True)

    def defer(self, job: Callable[[], None]) -> None:
        """Run `job` when the files are written: now, or in the background after the snapshot."""
        self._do(job)

    def settle(self) -> None:
        """The snapshot is complete (background saves): the training loop may change the state now."""
        if self._snapshots is not None:
            self._settled = self._snapshots.settle()

    def finish(self) -> dict[str, dict[str, Any]]:
        """Write whatever is pending; returns {name: {"size", "crc32c"}} of every file written."""
        self._settled()
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job()
        return self.ledger.entries()

    def _do(self, job: Callable[[], None]) -> None:
        if self.background:
            self._jobs.append(job)
        else:
            job()


def save_torch(obj: Any, stream: DurableFile) -> None:
    """`torch.save` into a `DurableFile`, without the zip container's own CRC-32 (the manifest's CRC-32C
    covers the file). A value torch cannot store is a `CheckpointError` naming the file."""
    with stream:
        try:
            with _no_zip_crc():
                torch.save(obj, stream)  # type: ignore[arg-type]
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise CheckpointError(
                f"{stream.name!r} cannot be saved: {e}. A checkpointed object (an optimizer's param_groups, a "
                "scheduler, a registered object) holds a value torch.save cannot store, such as a lambda or an "
                "open file; keep such state to tensors and plain Python values."
            ) from e


def _no_zip_crc() -> Any:
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.5
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})  # type: ignore[attr-defined]


def torch_bytes(obj: Any) -> bytes:
    """`torch.save` into memory (for small objects a background save must snapshot at once)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
