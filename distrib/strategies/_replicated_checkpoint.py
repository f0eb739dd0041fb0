"""Checkpoint functions for strategies where every rank holds the whole model (single, DDP).

Rank 0 writes each prepared model's unwrapped state dict as `model_{i}.safetensors` and each optimizer's
state dict as `optimizer_{i}.pt` (readable with `torch.load(weights_only=True)`); every rank reads them
back onto its own device. Nothing depends on the number of processes, so a checkpoint loads on any.
The weights are read straight into the prepared parameters (CPU) or through one staging copy (other
devices), checked against the manifest while they are read.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

import torch

from ..checkpointing._tensors import unwrapped
from ..errors import CheckpointCorruptError, CheckpointMismatchError

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..checkpointing._reader import CheckpointReader
    from ..checkpointing._writer import CheckpointWriter

#: Whether a checkpoint must be loaded with the world size it was saved with.
CHECKPOINT_WORLD_SIZE_DEPENDENT = False


def full_state_dict(runtime: Runtime, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's complete state dict (every rank has it whole here)."""
    return dict(unwrapped(runtime, model).state_dict())


def save_training_state(runtime: Runtime, writer: CheckpointWriter) -> None:
    """Rank 0 writes `model_{i}.safetensors` and `optimizer_{i}.pt` for every prepared object."""
    if runtime.rank != 0:
        return
    for i, model in enumerate(runtime.state.models):
        writer.tensors(f"model_{i}.safetensors", full_state_dict(runtime, model))
    for i, optimizer in enumerate(runtime.state.optimizers):
        writer.torch_object(f"optimizer_{i}.pt", optimizer.state_dict())


def load_training_state(runtime: Runtime, reader: CheckpointReader) -> None:
    """Load every model and optimizer saved by `save_training_state` onto this rank's device."""
    if reader.has(".metadata"):  # a DCP checkpoint (FSDP, tensor/pipeline parallel): reshard it
        from . import _fsdp_checkpoint

        with warnings.catch_warnings():  # one process without a group: DCP says it reads alone, as meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return _fsdp_checkpoint.load_training_state(runtime, reader)
    state = runtime.state
    check_count(reader, "model", "safetensors", len(state.models))
    check_count(reader, "optimizer", "pt", len(state.optimizers))
    for i, model in enumerate(state.models):
        load_model_file(reader, f"model_{i}.safetensors", unwrapped(runtime, model), i)
    for i, optimizer in enumerate(state.optimizers):
        optimizer.load_state_dict(reader.torch_object(f"optimizer_{i}.pt", runtime.device))


def check_count(reader: CheckpointReader, kind: str, suffix: str, expected: int) -> None:
    """Raise `CheckpointMismatchError` unless the manifest lists `expected` files `{kind}_{i}.{suffix}`."""
    pattern = re.compile(rf"{kind}_(\d+)\.{suffix}")
    found = sorted(int(m.group(1)) for name in reader.names() if (m := pattern.fullmatch(name)))
    directory = reader.directory
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


def load_model_file(reader: CheckpointReader, name: str, model: torch.nn.Module, index: int) -> None:
    """Load a model's safetensors file into `model`: keys and shapes are checked from the file's header
    before any byte is read, then the bytes go straight into the parameters where they fit."""
    from ..checkpointing._stfile import SafetensorsFile

    expected = model.state_dict()
    header = SafetensorsFile(reader.path(name), reader.files[name]["size"])
    shapes = {k: e.shape for k, e in header.entries.items()}
    aliases = _aliases(header.metadata)
    shapes.update({alias: shapes[source] for alias, source in aliases.items() if source in shapes})
    check_model_keys(model, shapes, name, index)
    tensors = reader.tensors(name, destinations=expected)
    _copy_rest(expected, tensors)


def _aliases(metadata: dict[str, str]) -> dict[str, str]:
    import json

    from ..checkpointing._tensors import ALIASES_KEY

    try:
        value = json.loads(metadata.get(ALIASES_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _copy_rest(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy into the model what could not be read straight into it (other devices, dtypes, layouts)."""
    with torch.no_grad():
        for key, target in expected.items():
            value = tensors[key]
            if value is not target and not _same_memory(value, target):
                target.copy_(value, non_blocking=value.device.type == "cpu" and target.device.type == "cuda")


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], name: str, index: int) -> None:
    """`model.load_state_dict(tensors)` with an error that lists missing, unexpected and reshaped keys."""
    check_model_keys(model, {k: tuple(v.shape) for k, v in tensors.items()}, name, index)
    model.load_state_dict(tensors)


def check_model_keys(
    model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], name: str, index: int
) -> None:
    """Raise `CheckpointMismatchError` listing missing, unexpected and reshaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    reshaped = [
        f"{k} {tuple(shapes[k])} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in shapes and tuple(shapes[k]) != tuple(v.shape)
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
