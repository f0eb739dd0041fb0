"""Data parallel over torch.distributed: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ._defaults import backward as backward
from ._defaults import check_model as check_model
from ._defaults import clip_grad_norm_ as clip_grad_norm_
from ._defaults import place_model
from ._defaults import precision_plan as precision_plan
from ._defaults import replicated_tensors as replicated_tensors
from ._defaults import setup as setup
from ._defaults import teardown as teardown
from ._process_group import choose_device as choose_device
from ._process_group import collective_device as collective_device
from ._process_group import init_process_group as init_process_group
from ._replicated_checkpoint import CHECKPOINT_WORLD_SIZE_DEPENDENT as CHECKPOINT_WORLD_SIZE_DEPENDENT
from ._replicated_checkpoint import full_state_dict as full_state_dict
from ._replicated_checkpoint import load_training_state as load_training_state
from ._replicated_checkpoint import save_training_state as save_training_state

if TYPE_CHECKING:
    from .._runtime import Runtime

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
    return [wrap(runtime, m) for m in models], optimizers, schedulers


@contextlib.contextmanager
def no_sync(runtime: Runtime, model: torch.nn.Module) -> Iterator[None]:
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
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
    return model.module if isinstance(model, DistributedDataParallel) else model
