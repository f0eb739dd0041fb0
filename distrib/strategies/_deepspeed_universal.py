"""Loading a DeepSpeed checkpoint at another world size through DeepSpeed's universal checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CheckpointMismatchError

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..checkpointing._reader import CheckpointReader


def load_resharded(runtime: Runtime, reader: CheckpointReader, saved_world_size: int) -> None:
    raise CheckpointMismatchError(
        f"this DeepSpeed checkpoint was saved by {saved_world_size} processes; this run has {runtime.world_size}."
    )
