"""FSDP2 checkpoints through torch.distributed.checkpoint (DCP).

Every rank writes only its own shards, and DCP re-shards on load, so a checkpoint saved on N processes
loads on M. The state saved for prepared model `i` is under the key `model_{i}`, for prepared optimizer
`j` under `optimizer_{j}` (the optimizer's state is keyed by parameter name, as DCP's
`get_optimizer_state_dict` makes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .._runtime import Runtime

CHECKPOINT_WORLD_SIZE_DEPENDENT = False


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # PreparedOptimizer wraps the user's optimizer


def _owner(models: list[nn.Module], optimizer: torch.optim.Optimizer) -> nn.Module:
    """The prepared model whose parameters `optimizer` updates."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in models:
        if any(id(p) in ids for p in model.parameters()):
            return model
    raise CheckpointError(
        "a prepared optimizer updates no parameter of a prepared model, so FSDP cannot name its state; "
        "prepare the model it optimizes too."
    )


def _pairs(runtime: Runtime) -> tuple[list[nn.Module], list[tuple[nn.Module, torch.optim.Optimizer]]]:
    from ..parallel._checkpoint import checkpoint_module  # N-D parallelism: pipeline / DDP wrappers

    models = [checkpoint_module(m) for m in runtime.state.models]
    optimizers = [_inner(o) for o in runtime.state.optimizers]
    return models, [(_owner(models, o), o) for o in optimizers]


def _current_state(runtime: Runtime) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    models, pairs = _pairs(runtime)
    state: dict[str, Any] = {f"model_{i}": get_model_state_dict(m) for i, m in enumerate(models)}
    for j, (model, optimizer) in enumerate(pairs):
        state[f"optimizer_{j}"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_training_state(runtime: Runtime, directory: Path) -> None:
    """Write every prepared model's and optimizer's shards into `directory` (all ranks call this)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_current_state(runtime), checkpoint_id=str(directory))


def load_training_state(runtime: Runtime, directory: Path) -> None:
    """Load what `save_training_state` wrote, at this run's number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _current_state(runtime)
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except CheckpointException as exc:  # a BaseException that lists each rank's failure
        raise CheckpointError(
            f"could not load the FSDP checkpoint in {str(directory)!r}: {exc}. It must come from a run "
            "with the same models and optimizers (the number of processes may differ)."
        ) from exc
    models, pairs = _pairs(runtime)
    for i, model in enumerate(models):
        set_model_state_dict(model, state[f"model_{i}"])
    for j, (model, optimizer) in enumerate(pairs):
        set_optimizer_state_dict(model, optimizer, state[f"optimizer_{j}"])


def full_state_dict(runtime: Runtime, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict, on the CPU of rank 0 (None on the others). All ranks must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..parallel import _checkpoint as parallel_checkpoint

    if parallel_checkpoint.uses_dcp(runtime):  # N-D parallelism: pipeline stages send theirs to rank 0
        return parallel_checkpoint.full_state_dict(runtime, model)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if runtime.rank == 0 else None
