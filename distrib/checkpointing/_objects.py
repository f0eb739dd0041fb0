"""Everything in a checkpoint besides models, optimizers and random states.

* `training_state.json`: step counters (with the position in the accumulation window) and each prepared
  dataloader's position (epoch, batches yielded, shuffling seed);
* `scheduler_{i}.pt`, `custom_{i}.pt` (objects given to `register_for_checkpointing`): their state dicts,
  saved with `torch.save` and read with `torch.load(weights_only=True)` unless the caller opts out;
* `scaler.json`: the fp16 gradient scaler;
* `gradients_{rank}.safetensors`: only for a checkpoint taken in the middle of an accumulation window,
  the gradients accumulated so far on each rank (they differ between ranks until the window closes).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointCorruptError, CheckpointMismatchError
from ._tensors import unwrapped

if TYPE_CHECKING:
    from .._runtime import Runtime, TrainingState
    from ._reader import CheckpointReader
    from ._writer import CheckpointWriter

TRAINING_STATE = "training_state.json"
SCALER = "scaler.json"


def contents(state: TrainingState) -> dict[str, int]:
    """How many objects of each kind the run has; stored in the manifest and compared on load."""
    return {
        "models": len(state.models),
        "optimizers": len(state.optimizers),
        "schedulers": len(state.schedulers),
        "dataloaders": len(state.dataloaders),
        "custom_objects": len(state.custom_objects),
        "scaler": int(state.scaler is not None),
    }


def check_contents(saved: dict[str, int], state: TrainingState, directory: Path) -> None:
    """Raise `CheckpointMismatchError` listing every kind of object whose count differs."""
    now = contents(state)
    diffs = [f"{saved.get(k, 0)} {k} saved, {n} in this run" for k, n in now.items() if saved.get(k, 0) != n]
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoint {str(directory)!r} does not fit this run: {'; '.join(diffs)}. Prepare the same "
            "models, optimizers, schedulers and dataloaders (in the same order), register the same objects "
            "with register_for_checkpointing() and use the same mixed precision before load_state()."
        )


def window_position(state: TrainingState) -> tuple[int, int]:
    """(micro_step, window_size) as seen between micro-steps: (0, 1) once the window has closed."""
    return (0, 1) if state.sync_gradients else (state.micro_step, state.window_size)


def save_objects(runtime: Runtime, writer: CheckpointWriter) -> None:
    """Write this module's files (rank 0 the shared ones, every rank its own gradients)."""
    state = runtime.state
    micro_step, _ = window_position(state)
    if micro_step:
        writer.tensors(f"gradients_{runtime.rank}.safetensors", _gradients(runtime))
    if runtime.rank != 0:
        return
    writer.json(TRAINING_STATE, _counters(state))
    if state.scaler is not None:
        writer.json(SCALER, state.scaler.state_dict())
    for kind, objects in (("scheduler", state.schedulers), ("custom", state.custom_objects)):
        for i, obj in enumerate(objects):
            writer.torch_object(f"{kind}_{i}.pt", obj.state_dict(), small=True)


def load_objects(runtime: Runtime, reader: CheckpointReader) -> None:
    """Restore what `save_objects` wrote, on this rank."""
    state = runtime.state
    for kind, objects in (("scheduler", state.schedulers), ("custom", state.custom_objects)):
        for i, obj in enumerate(objects):
            obj.load_state_dict(reader.torch_object(f"{kind}_{i}.pt", "cpu"))
    if state.scaler is not None:
        state.scaler.load_state_dict(reader.json(SCALER))
    counters = reader.json(TRAINING_STATE)
    try:
        _restore_counters(runtime, counters, reader)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointCorruptError(
            f"{str(reader.directory / TRAINING_STATE)!r} is malformed ({type(e).__name__}: {e}); restore it or "
            "load another checkpoint."
        ) from e


def _restore_counters(runtime: Runtime, counters: dict[str, Any], reader: CheckpointReader) -> None:
    state = runtime.state
    positions = counters["dataloaders"]
    if not isinstance(positions, list) or len(positions) != len(state.dataloaders):
        raise ValueError(f"{len(state.dataloaders)} dataloader positions expected")
    # each load decides afresh whether a loader changes the accumulation steps to keep its global batch
    # on another number of processes (distrib/_data/position.py)
    state.gradient_accumulation_steps = None
    state.extensions.pop("data.accumulation_changed_by", None)
    for loader, position in zip(state.dataloaders, positions):
        loader.load_state_dict(position)
    state.optimizer_steps = int(counters["optimizer_steps"])
    state.optimizer_step_skipped = bool(counters["optimizer_step_skipped"])
    state.micro_step = int(counters["micro_step"])
    state.window_size = int(counters["window_size"])
    state.sync_gradients = state.micro_step == 0
    if state.micro_step:
        _load_gradients(runtime, reader, counters)


def _counters(state: TrainingState) -> dict[str, Any]:
    micro_step, window_size = window_position(state)
    return {
        "optimizer_steps": state.optimizer_steps,
        "optimizer_step_skipped": state.optimizer_step_skipped,
        "micro_step": micro_step,
        "window_size": window_size,
        "dataloaders": [loader.state_dict() for loader in state.dataloaders],
    }


def _gradients(runtime: Runtime) -> dict[str, torch.Tensor]:
    grads = {}
    for i, model in enumerate(runtime.state.models):
        for name, param in unwrapped(runtime, model).named_parameters():
            if param.grad is not None:
                grad = param.grad
                grads[f"{i}:{name}"] = grad.to_local() if hasattr(grad, "to_local") else grad
    return grads


def _load_gradients(runtime: Runtime, reader: CheckpointReader, counters: dict[str, Any]) -> None:
    name = f"gradients_{runtime.rank}.safetensors"
    if not reader.has(name):
        raise CheckpointMismatchError(
            f"the checkpoint {str(reader.directory)!r} was taken in the middle of an accumulation window "
            f"(micro-step {counters['micro_step']} of {counters['window_size']}) and holds no gradients for "
            f"rank {runtime.rank}; resume it with the world size it was saved with, or save at a window "
            "boundary (outside `accumulate`, after optimizer.step())."
        )
    saved = reader.tensors(name)
    for i, model in enumerate(runtime.state.models):
        for name, param in unwrapped(runtime, model).named_parameters():
            grad = saved.get(f"{i}:{name}")
            if grad is None:
                param.grad = None
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            target = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            target.copy_(grad)
