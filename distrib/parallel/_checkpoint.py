"""Checkpoints of models split by tensor or pipeline parallelism.

`save_state` / `load_state` go through torch.distributed.checkpoint (DCP, the FSDP strategy's format, see
`strategies/_fsdp_checkpoint.py`): every rank writes its shards under the whole model's parameter names, and
DCP reshards on load, so a checkpoint saved at tp=2 loads at tp=1, as FSDP only, or at another pipeline
size. `save_model` gathers the whole, unsharded model on rank 0: DTensors are gathered over their mesh,
and each pipeline stage's weights travel to rank 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointMismatchError
from ._pipeline import PipelinedModel

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..checkpointing._reader import CheckpointReader


def uses_dcp(runtime: Runtime) -> bool:
    """True when some rank holds only part of a model, so checkpoints must be written by every rank."""
    return runtime.parallel is not None and runtime.parallel.dims.splits_models


def require_dcp(reader: CheckpointReader) -> None:
    """A split model loads only DCP checkpoints (shards with their global layout)."""
    if not reader.has(".metadata"):
        raise CheckpointMismatchError(
            f"{str(reader.directory)!r} holds whole models written by one rank (a run without tensor or pipeline "
            "parallelism, strategy single or ddp), which a run whose model is split over ranks cannot "
            "reshard. Resume it without tensor/pipeline parallelism (or with strategy='fsdp'), save_state "
            "there, and load that checkpoint here."
        )


def checkpoint_module(model: nn.Module) -> nn.Module:
    """The module whose state dict has the user's parameter names (inside a pipeline or DDP wrapper)."""
    if isinstance(model, PipelinedModel):
        return model.module
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def full_state_dict(runtime: Runtime, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0's CPU (None elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = checkpoint_module(model)
    # no cpu_offload: that keeps the state on rank 0 only, but every pipeline stage needs its own
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in state.items() if isinstance(v, torch.Tensor)}
    parallel = runtime.parallel
    if parallel is not None and parallel.size("pp") > 1:
        tensors = _stages_to_rank0(runtime, tensors)
    return tensors if runtime.rank == 0 else None


def _stages_to_rank0(runtime: Runtime, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0 receives the state of the other stages of its pipeline (the ranks of its `pp` group)."""
    parallel = runtime.parallel
    assert parallel is not None
    group = parallel.group("pp")
    members = [dist.get_global_rank(group, i) for i in range(parallel.size("pp"))]
    if 0 not in members:
        return tensors  # another pipeline group's copy of the same weights: rank 0 has its own
    device = runtime.collective_device
    header: list[Any] = [[(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]]
    headers: list[Any] = [None] * len(members)
    dist.all_gather_object(headers, header[0], group=group)
    if runtime.rank == 0:
        for src, specs in zip(members[1:], headers[1:]):
            for key, shape, dtype in specs:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buffer, src=src, group=group)
                tensors.setdefault(key, buffer.cpu())
    else:
        for tensor in tensors.values():
            dist.send(tensor.to(device).contiguous(), dst=0, group=group)
    return tensors
