"""A strategy's own checkpoint functions, called directly (without save_state's other parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distrib.checkpointing._manifest import (
    build,
    describe_unrecorded,
    list_files,
    read_manifest,
    write_manifest,
)
from distrib.checkpointing._reader import CheckpointReader
from distrib.checkpointing._sync import all_gather, barrier
from distrib.checkpointing._writer import CheckpointWriter


def save_direct(ctx: Any, directory: Path) -> None:
    """`strategy.save_training_state` into `directory`, with a manifest (all ranks call it)."""
    directory.mkdir(parents=True, exist_ok=True)
    barrier(ctx)
    writer = CheckpointWriter(directory, ctx.rank)
    ctx.strategy_module.save_training_state(ctx, writer)
    parts = all_gather(ctx, writer.finish())
    if ctx.rank == 0:
        files = {name: entry for part in parts for name, entry in part.items()}
        files.update(describe_unrecorded(directory, [n for n in list_files(directory) if n not in files]))
        metadata = {"world_size": ctx.world_size, "step": 0, "strategy": ctx.strategy}
        write_manifest(directory, build(metadata, files, 0))
    barrier(ctx)


def load_direct(ctx: Any, directory: Path, *, weights_only: bool = True) -> None:
    """`strategy.load_training_state` from what `save_direct` wrote."""
    reader = CheckpointReader(directory, read_manifest(directory), weights_only=weights_only)
    ctx.strategy_module.load_training_state(ctx, reader)
