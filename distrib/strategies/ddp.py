"""Data parallel over torch.distributed: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..parallel import _checkpoint as _parallel_checkpoint
from ..parallel import _clip, _compose
from . import _defaults, _fsdp_checkpoint, _replicated_checkpoint
from ._defaults import backward as backward
from ._defaults import check_model as check_model
from ._defaults import place_model
from ._defaults import precision_plan as precision_plan
from ._defaults import replicated_tensors as replicated_tensors
from ._defaults import setup as setup
from ._defaults import teardown as teardown
from ._process_group import choose_device as choose_device
from ._process_group import collective_device as collective_device
from ._process_group import init_process_group as init_process_group
from ._replicated_checkpoint import CHECKPOINT_WORLD_SIZE_DEPENDENT as CHECKPOINT_WORLD_SIZE_DEPENDENT

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..checkpointing._reader import CheckpointReader
    from ..checkpointing._writer import CheckpointWriter

NAME = "ddp"


def is_available() -> bool:
    return torch.distributed.is_available()


def unavailable_reason() -> str:
    return "this build of torch has no torch.distributed support."


def wrap(runtime: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """Place the model and wrap it in DistributedDataParallel (when there is more than one process)."""
    model = place_model(runtime, model)
    if runtime.world_size == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    opts = runtime.settings.ddp
    kwargs: dict[str, Any] = {
        "find_unused_parameters": opts.find_unused_parameters,
        "static_graph": opts.static_graph,
        "gradient_as_bucket_view": opts.gradient_as_bucket_view,
    }
    if not opts.broadcast_buffers:  # passed only when changed: torch 2.13 deprecates the keyword
        kwargs["broadcast_buffers"] = False
    if opts.bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = opts.bucket_cap_mb
    if runtime.device.type == "cuda":
        kwargs["device_ids"] = [runtime.device.index]
    return DistributedDataParallel(model, **kwargs)


def prepare_training(
    runtime: Runtime, models: list[torch.nn.Module], optimizers: list[Any], schedulers: list[Any]
) -> tuple[list[torch.nn.Module], list[Any], list[Any]]:
    if runtime.parallel is not None:  # N-D parallelism: split, tensor parallel, DP over its dimension
        return _compose.prepare_training(runtime, models, optimizers, schedulers)
    return [wrap(runtime, m) for m in models], optimizers, schedulers


@contextlib.contextmanager
def no_sync(runtime: Runtime, model: torch.nn.Module) -> Iterator[None]:
    model = _compose.no_sync_target(model)  # N-D parallelism: a pipeline's stage module
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif (replicated := _compose.as_fsdp_module(model)) is not None:  # N-D parallelism: torch's replicate
        replicated.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            replicated.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def sync_now(runtime: Runtime, model: torch.nn.Module) -> Iterator[None]:
    """All-reduce in the next backward although the forward ran under `no_sync`: DDP prepares its reducer
    in the forward, so it is prepared here for a backward over every parameter."""
    if not isinstance(model, DistributedDataParallel):
        yield
        return
    saved = model.require_backward_grad_sync
    model.require_backward_grad_sync = True
    model.reducer.prepare_for_backward([])
    try:
        yield
    finally:
        model.require_backward_grad_sync = saved


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return _compose.unwrap(model)


def clip_grad_norm_(
    runtime: Runtime, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float
) -> torch.Tensor:
    if _parallel_checkpoint.uses_dcp(runtime):  # N-D parallelism: gradients split over tp/pp ranks
        return _clip.clip_grad_norm_(runtime, parameters, max_norm, norm_type)
    return _defaults.clip_grad_norm_(runtime, parameters, max_norm, norm_type)


# checkpoints: whole models from rank 0, or DCP shards from every rank when tp/pp split the model
def save_training_state(runtime: Runtime, writer: CheckpointWriter) -> None:
    if _parallel_checkpoint.uses_dcp(runtime):
        return _fsdp_checkpoint.save_training_state(runtime, writer)
    return _replicated_checkpoint.save_training_state(runtime, writer)


def load_training_state(runtime: Runtime, reader: CheckpointReader) -> None:
    if _parallel_checkpoint.uses_dcp(runtime):
        _parallel_checkpoint.require_dcp(reader)
        return _fsdp_checkpoint.load_training_state(runtime, reader)
    return _replicated_checkpoint.load_training_state(runtime, reader)


def full_state_dict(runtime: Runtime, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    if _parallel_checkpoint.uses_dcp(runtime):
        return _parallel_checkpoint.full_state_dict(runtime, model)
    return _replicated_checkpoint.full_state_dict(runtime, model)
