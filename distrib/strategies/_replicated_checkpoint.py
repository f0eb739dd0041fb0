"""Checkpoint functions for strategies where every rank holds the whole model (single, DDP).

Rank 0 writes each prepared model's unwrapped state dict as `model_{i}.safetensors` and each optimizer's
state dict as `optimizer_{i}.pt` (readable with `torch.load(weights_only=True)`); every rank reads them
back onto its own device. Nothing depends on the number of processes, so a checkpoint loads on any.
Files are written plainly: `save_state` writes into a temporary directory, fsyncs every file and renames
the directory into place only once it is complete.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpointing._tensors import (
    load_torch_file,
    read_tensors,
    save_torch_file,
    unwrapped,
    write_tensors,
)
from ..errors import CheckpointCorruptError, CheckpointMismatchError

if TYPE_CHECKING:
    from .._runtime import Runtime

#: Whether a checkpoint must be loaded with the world size it was saved with.
CHECKPOINT_WORLD_SIZE_DEPENDENT = False


def full_state_dict(runtime: Runtime, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's complete state dict (every rank has it whole here)."""
    return dict(unwrapped(runtime, model).state_dict())


def save_training_state(runtime: Runtime, directory: Path) -> None:
    """Rank 0 writes `model_{i}.safetensors` and `optimizer_{i}.pt` for every prepared object."""
    if runtime.rank != 0:
        return
    for i, model in enumerate(runtime.state.models):
        write_tensors(directory / f"model_{i}.safetensors", full_state_dict(runtime, model))
    for i, optimizer in enumerate(runtime.state.optimizers):
        save_torch_file(optimizer.state_dict(), directory / f"optimizer_{i}.pt")


def load_training_state(runtime: Runtime, directory: Path) -> None:
    """Load every model and optimizer saved by `save_training_state` onto this rank's device."""
    if (directory / ".metadata").is_file():  # a DCP checkpoint (FSDP, tensor/pipeline parallel): reshard it
        from . import _fsdp_checkpoint

        with warnings.catch_warnings():  # one process without a group: DCP says it reads alone, as meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return _fsdp_checkpoint.load_training_state(runtime, directory)
    state = runtime.state
    check_count(directory, "model", "safetensors", len(state.models))
    check_count(directory, "optimizer", "pt", len(state.optimizers))
    for i, model in enumerate(state.models):
        path = directory / f"model_{i}.safetensors"
        load_model_state(unwrapped(runtime, model), read_tensors(path, runtime.device), path.name, i)
    for i, optimizer in enumerate(state.optimizers):
        path = directory / f"optimizer_{i}.pt"
        optimizer.load_state_dict(load_torch_file(path, runtime.device, weights_only=True))


def check_count(directory: Path, kind: str, suffix: str, expected: int) -> None:
    """Raise `CheckpointMismatchError` unless the directory holds `expected` files `{kind}_{i}.{suffix}`."""
    pattern = re.compile(rf"{kind}_(\d+)\.{suffix}")
    found = sorted(int(m.group(1)) for p in directory.iterdir() if (m := pattern.fullmatch(p.name)))
    if len(found) != expected:
        raise CheckpointMismatchError(
            f"the checkpoint {str(directory)!r} holds {len(found)} {kind}(s), but this run prepared "
            f"{expected}; prepare() the same {kind}s, in the same order, as the run that saved it."
        )
    if found != list(range(expected)):
        missing = sorted(set(range(expected)) - set(found))
        raise CheckpointCorruptError(
            f"the checkpoint {str(directory)!r} lacks {', '.join(f'{kind}_{i}.{suffix}' for i in missing)}."
        )


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], name: str, index: int) -> None:
    """`model.load_state_dict(tensors)` with an error that lists missing, unexpected and reshaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    reshaped = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        parts = [
            f"{label}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
            for label, keys in (
                ("missing from the checkpoint", missing),
                ("not in the model", unexpected),
                ("different shapes (checkpoint vs model)", reshaped),
            )
            if keys
        ]
        raise CheckpointMismatchError(
            f"{name} does not match model #{index} ({type(model).__name__}): {'; '.join(parts)}. Load it "
            "into the same architecture that saved it."
        )
    model.load_state_dict(tensors)
