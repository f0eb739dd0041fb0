"""DeepSpeed's file access through distrib: the checkpoint engine the DeepSpeed engine saves and loads
with, and the allow-list of DeepSpeed types that `weights_only=True` loads accept."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..checkpointing._reader import CheckpointReader
    from ..checkpointing._writer import CheckpointWriter


def deepspeed_engines(runtime: Runtime) -> list[Any]:
    return list(getattr(runtime.state.strategy_state, "engines", []))


def safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed's checkpoint files hold, allowed for `weights_only=True` loads."""
    found: list[Any] = []
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        with contextlib.suppress(ImportError):
            imported = __import__(module, fromlist=list(names))
            found.extend(getattr(imported, name) for name in names if hasattr(imported, name))
    return found


_allowed_depth = 0
_allowed_lock = threading.Lock()


@contextlib.contextmanager
def allow_deepspeed_types() -> Iterator[None]:
    """`safe_globals()` allowed for `weights_only=True` loads inside this block. Re-entrant: torch's own
    `safe_globals` context removes its classes on exit even when an outer block still needs them."""
    import torch

    global _allowed_depth
    with _allowed_lock:
        if _allowed_depth == 0:
            torch.serialization.add_safe_globals(safe_globals())
        _allowed_depth += 1
    try:
        yield
    finally:
        with _allowed_lock:
            _allowed_depth -= 1
            if _allowed_depth == 0:
                from torch import _weights_only_unpickler as unpickler

                unpickler._remove_safe_globals(safe_globals())


def engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class DistribCheckpointEngine(CheckpointEngine):  # type: ignore[misc]
        """DeepSpeed's file access, through a `CheckpointWriter` (saving) or `CheckpointReader` (loading)."""

        def __init__(
            self,
            writer: CheckpointWriter | None,
            reader: CheckpointReader | None,
            trusted: Path | None = None,
        ) -> None:
            super().__init__(None)
            self.name = "distrib"
            self.writer, self.reader = writer, reader
            self.trusted = trusted  # a folder distrib itself just produced (a universal conversion)

        def create(self, info: Any) -> None:
            pass

        def commit(self, info: Any) -> bool:
            return True

        def save(self, state_dict: Any, path: str) -> None:
            assert self.writer is not None, "DeepSpeed saved through distrib's loading engine"
            self.writer.torch_object(_relative(self.writer.directory, path), state_dict)

        def load(self, path: str, map_location: Any = None) -> Any:
            import torch

            with allow_deepspeed_types():
                if self.trusted is not None:
                    _relative(self.trusted, path)  # inside the folder, or ValueError
                    return torch.load(path, map_location=map_location, weights_only=True)
                assert self.reader is not None, "DeepSpeed loaded through distrib's saving engine"
                return self.reader.torch_object(_relative(self.reader.directory, path), map_location)

    return DistribCheckpointEngine


def _relative(directory: Path, path: str) -> str:
    return Path(path).absolute().relative_to(directory.absolute()).as_posix()


@contextlib.contextmanager
def through(engine: Any, replacement: Any) -> Iterator[None]:
    original = engine.checkpoint_engine
    engine.checkpoint_engine = replacement
    try:
        yield
    finally:
        engine.checkpoint_engine = original
