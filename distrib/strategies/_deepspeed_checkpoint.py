"""DeepSpeed checkpoints through distrib's writer and reader.

The engine writes its own layout (`engine.save_checkpoint`, tag `engine_{i}`: every rank its ZeRO
partition), but every file goes through a checkpoint engine of distrib's: writes are checksummed as they
happen (and snapshotted for background saves), reads come only from files the manifest lists, each
verified, and are unpickled with `weights_only=True` plus an allow-list of the few DeepSpeed types its
files hold (DeepSpeed itself unpickles them without restriction). `load_state(weights_only=False)` lifts
the restriction for checkpoints you trust.

At another world size, DeepSpeed's own universal-checkpoint tools reshard: `ds_to_universal` converts the
checkpoint (in a hidden folder next to it, removed afterwards) and the engine loads it with
`load_universal_checkpoint`. Where that is impossible the error names the conversion to run by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CheckpointError, CheckpointMismatchError
from ._deepspeed_files import deepspeed_engines, engine_class, through

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..checkpointing._reader import CheckpointReader
    from ..checkpointing._writer import CheckpointWriter

#: a DeepSpeed checkpoint loads at another world size through DeepSpeed's universal checkpoint
CHECKPOINT_WORLD_SIZE_DEPENDENT = False


def save_training_state(runtime: Runtime, writer: CheckpointWriter) -> None:
    """Every rank writes its ZeRO partitions of each engine's model and optimizer (collective)."""
    cls = engine_class()
    for i, engine in enumerate(deepspeed_engines(runtime)):
        with through(engine, cls(writer, None)):
            engine.save_checkpoint(str(writer.directory), tag=f"engine_{i}", save_latest=False)


def load_training_state(runtime: Runtime, reader: CheckpointReader) -> None:
    """Load what `save_training_state` wrote; at another world size through a universal checkpoint."""
    saved = int(reader.manifest["world_size"])
    if saved != runtime.world_size and deepspeed_engines(runtime):
        from ._deepspeed_universal import load_resharded

        load_resharded(runtime, reader, saved)
        return
    cls = engine_class()
    for i, engine in enumerate(deepspeed_engines(runtime)):
        tag = f"engine_{i}"
        if not any(name.startswith(f"{tag}/") for name in reader.names()):
            raise CheckpointError(f"{str(reader.directory)!r} holds no DeepSpeed checkpoint {tag!r}.")
        with through(engine, cls(None, reader)):
            path, _ = engine.load_checkpoint(
                str(reader.directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise CheckpointMismatchError(
                f"DeepSpeed could not load {tag!r} from {str(reader.directory)!r}; was it saved with the same "
                "ZeRO stage and models?"
            )
