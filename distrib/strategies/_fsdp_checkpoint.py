"""FSDP2 checkpoints through torch.distributed.checkpoint (DCP).

Every rank writes only its own shards, and DCP re-shards on load, so a checkpoint saved on N processes
loads on M. The state saved for prepared model `i` is under the key `model_{i}`, for prepared optimizer
`j` under `optimizer_{j}` (the optimizer's state is keyed by parameter name, as DCP's
`get_optimizer_state_dict` makes it). DCP's planners decide the layout; distrib's storage writer and
reader (`checkpointing/_dcp.py`) add the checksums, the manifest checks and safe unpickling. A
background save stages the shards to CPU memory with DCP's `async_save` and writes them in its thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..checkpointing._reader import CheckpointReader
    from ..checkpointing._writer import CheckpointWriter

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


def save_training_state(runtime: Runtime, writer: CheckpointWriter) -> None:
    """Write every prepared model's and optimizer's shards (all ranks call this): now, or, for a
    background save, staged to CPU now and written by DCP's `async_save` in the background."""
    import torch.distributed.checkpoint as dcp

    from ..checkpointing._dcp import storage_writer

    state = _current_state(runtime)
    storage = storage_writer(writer.directory, writer.ledger)
    if not writer.background:
        dcp.save(state, storage_writer=storage)
        return
    group = writer.process_group
    future: Any = dcp.async_save(state, storage_writer=storage, process_group=group)
    writer.defer(future.result)


def load_training_state(runtime: Runtime, reader: CheckpointReader) -> None:
    """Load what `save_training_state` wrote, at this run's number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from ..checkpointing._dcp import SafeLoadPlanner, StorageReader

    state = _current_state(runtime)
    storage = StorageReader(reader)
    storage.read_metadata()  # a damaged or forged .metadata raises its own CheckpointError here
    try:
        dcp.load(state, storage_reader=storage, planner=SafeLoadPlanner(reader.weights_only))
    except CheckpointException as exc:  # a BaseException that lists each rank's failure
        ours = _our_failure(exc)
        if ours is not None:  # a damaged or refused file: the same error every other strategy raises
            raise ours from exc
        raise CheckpointError(
            f"could not load the FSDP checkpoint in {str(reader.directory)!r}: {_failures(exc)}. It must come "
            "from a run with the same models and optimizers (the number of processes may differ)."
        ) from exc
    models, pairs = _pairs(runtime)
    for i, model in enumerate(models):
        set_model_state_dict(model, state[f"model_{i}"])
    for j, (model, optimizer) in enumerate(pairs):
        set_optimizer_state_dict(model, optimizer, state[f"optimizer_{j}"])


def _exceptions(exc: Any) -> list[tuple[int, BaseException]]:
    """(rank, exception) of each failure of a DCP `CheckpointException` (it keeps (exception, stack))."""
    failures = getattr(exc, "failures", None) or {}
    out = []
    for rank, failure in sorted(failures.items()):
        error = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(error, BaseException):
            out.append((rank, error))
    return out


def _our_failure(exc: Any) -> CheckpointError | None:
    """The first `CheckpointError` (a damaged or refused file) behind a DCP failure, naming its rank."""
    for rank, error in _exceptions(exc):
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, CheckpointError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            return type(cause)(f"{cause} (on rank {rank})")
    return None


def _failures(exc: Any) -> str:
    found = _exceptions(exc)
    if not found:
        return str(exc)
    return "; ".join(f"rank {rank}: {type(e).__name__}: {e}" for rank, e in found)


def full_state_dict(runtime: Runtime, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict, on the CPU of rank 0 (None on the others). All ranks must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..parallel import _checkpoint as parallel_checkpoint

    if parallel_checkpoint.uses_dcp(runtime):  # N-D parallelism: pipeline stages send theirs to rank 0
        return parallel_checkpoint.full_state_dict(runtime, model)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if runtime.rank == 0 else None
