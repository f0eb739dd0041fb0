"""How a model is prepared under N-D parallelism, in torchtitan's order.

1. pipeline split (`_split.py`): this rank keeps its stage;
2. model converters: the precision plan's (fp8), then the move to the device;
3. tensor / sequence parallel (`apply_tensor_parallel`, the plan of `_plans.py`);
4. activation checkpointing, `torch.compile`, FSDP2 on the data-shard dimension: the FSDP strategy does
   these (`strategies/fsdp.py`); with the DDP strategy, gradients are averaged over the data-parallel
   (and context-parallel) ranks instead: by torch's FSDP2-based `replicate` on a model of DTensors or a
   pipeline stage (DDP's reducer takes neither), else by `DistributedDataParallel`;
5. the pipeline wrapper (`PipelinedModel`), whose call runs the schedule.

Optimizers built before `prepare` are re-pointed at the parameters that replaced theirs (tensor parallel
and `replicate` swap in DTensors), and lose the parameters of layers another stage holds.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _precision
from .._options import DDPOptions
from ..errors import DistribWarning
from ..strategies import _fsdp_params
from . import _plans
from ._pipeline import PipelinedModel
from ._split import split_model

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

    from .._runtime import Runtime

#: keys in `runtime.state.extensions`: ids of parameters the pipeline split removed from prepared models,
#: and which parameter replaced which (for optimizers prepared in a later call)
REMOVED_KEY = "parallel.removed_params"
PARAM_MAP_KEY = "parallel.param_map"


def split_for_pipeline(runtime: Runtime, model: nn.Module) -> nn.Module:
    """Keep this rank's pipeline stage of `model` (in place); remember what left for the optimizers."""
    parallel = runtime.parallel
    if parallel is None or parallel.size("pp") == 1:
        return model
    options = parallel.options
    removed = split_model(
        model, pp=parallel.size("pp"), stage=parallel.rank("pp"), split_points=options.pp_split_points
    )
    runtime.state.extensions.setdefault(REMOVED_KEY, set()).update(removed)
    return model


def apply_tensor_parallel(runtime: Runtime, model: nn.Module) -> None:
    """Split the planned modules over the `tp` dimension (no-op without tensor parallelism)."""
    parallel = runtime.parallel
    if parallel is None or parallel.size("tp") == 1:
        return
    from torch.distributed.tensor.parallel import parallelize_module

    plan = _plans.resolve(model, parallel.options.tp_plan, parallel.size("tp"))
    mesh = parallel.submesh("tp")
    group = parallel.group("tp")
    # ranks of a tensor-parallel group must hold the same replicated weights and draw the same random
    # numbers (dropout on activations they all hold): take tp-rank 0's, once
    broadcast_module(model, group, runtime.collective_device)
    sync_random_state(group, runtime.collective_device)
    for _, module, style in plan:
        parallelize_module(module, mesh, style)


def broadcast_module(model: nn.Module, group: Any, device: torch.device) -> None:
    """Every parameter and buffer (this rank's part of a DTensor) set to the group's first rank's values."""
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            local = getattr(tensor, "_local_tensor", tensor)
            if local.is_meta:
                continue
            moved = local.detach().to(device)
            dist.broadcast(moved, src=src, group=group)
            if moved is not local:
                local.copy_(moved)


def sync_random_state(group: Any, device: torch.device) -> None:
    """Give every rank of `group` the random state of its first rank (CPU, and the current CUDA device)."""
    src = dist.get_global_rank(group, 0)
    state = torch.get_rng_state().to(device)
    dist.broadcast(state, src=src, group=group)
    torch.set_rng_state(state.cpu())
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state().to(device)
        dist.broadcast(cuda_state, src=src, group=group)
        torch.cuda.set_rng_state(cuda_state.cpu())


def has_dtensors(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def wrap_data_parallel(runtime: Runtime, model: nn.Module) -> nn.Module:
    """Average gradients over the data- and context-parallel ranks (the DDP strategy's part)."""
    parallel = runtime.parallel
    assert parallel is not None
    if parallel.size("dp_cp") == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    # DDP's reducer cannot take DTensors, nor the several backward passes a pipeline step runs
    if has_dtensors(model) or parallel.size("pp") > 1:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        if runtime.settings.ddp != DDPOptions() and runtime.rank == 0:
            warnings.warn(
                f"DDPOptions {runtime.settings.ddp} are not used: a tensor- or pipeline-parallel model "
                "averages its gradients over the data-parallel ranks with torch's FSDP2-based replicate, "
                "not DistributedDataParallel. Drop the ddp options.",
                DistribWarning,
                stacklevel=2,
            )

        broadcast_module(model, parallel.group("dp_cp"), runtime.collective_device)
        replicate(model, mesh=parallel.submesh("dp_cp"))
        return model
    opts = runtime.settings.ddp
    kwargs: dict[str, Any] = {
        "process_group": parallel.group("dp_cp"),
        "find_unused_parameters": opts.find_unused_parameters,
        "static_graph": opts.static_graph,
        "gradient_as_bucket_view": opts.gradient_as_bucket_view,
    }
    if not opts.broadcast_buffers:
        kwargs["broadcast_buffers"] = False
    if opts.bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = opts.bucket_cap_mb
    if runtime.device.type == "cuda":
        kwargs["device_ids"] = [runtime.device.index]
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def wrap_pipeline(runtime: Runtime, model: nn.Module, stage_module: nn.Module | None = None) -> nn.Module:
    """The `PipelinedModel` users call, or the model itself without pipeline parallelism."""
    parallel = runtime.parallel
    if parallel is None or parallel.size("pp") == 1:
        return stage_module if stage_module is not None else model
    return PipelinedModel(model, stage_module if stage_module is not None else model, runtime)


def prepare_training(
    runtime: Runtime, models: list[nn.Module], optimizers: list[Any], schedulers: list[Any]
) -> tuple[list[nn.Module], list[Any], list[Any]]:
    """The DDP strategy's `prepare_training` under N-D parallelism (steps 1-3 and 5 of the docstring)."""
    # kept for the run: an optimizer built before prepare(model) may come in a later prepare() call
    param_map: _fsdp_params.ParamMap = runtime.state.extensions.setdefault(PARAM_MAP_KEY, {})
    prepared = []
    for model in models:
        split_for_pipeline(runtime, model)
        _precision.convert(runtime, model)
        if runtime.settings.device_placement:
            model.to(runtime.device)
        before = _fsdp_params.names_by_id(model)
        apply_tensor_parallel(runtime, model)
        _precision.wrap_forward(runtime, model)
        wrapped = wrap_data_parallel(runtime, model)
        _fsdp_params.update_param_map(param_map, before, model)
        prepared.append(wrap_pipeline(runtime, model, wrapped))
    repoint_optimizers(runtime, optimizers, param_map)
    return prepared, optimizers, schedulers


def repoint_optimizers(runtime: Runtime, optimizers: list[Any], param_map: _fsdp_params.ParamMap) -> None:
    """Optimizers step the parameters that replaced theirs, and drop those another stage holds."""
    removed = runtime.state.extensions.get(REMOVED_KEY, set())
    for optimizer in optimizers:
        _fsdp_params.repoint_optimizer(optimizer, param_map)
        if removed:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in removed]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a pipeline wrapper (then inside DDP)."""
    if isinstance(model, PipelinedModel):
        model = model.module
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def no_sync_target(model: nn.Module) -> nn.Module:
    """The module whose gradient synchronisation `no_sync` switches off."""
    if isinstance(model, PipelinedModel):
        return model._stage_module
    return model


def as_fsdp_module(model: nn.Module) -> FSDPModule | None:
    """The model as an FSDP2 module (`fully_shard`, or torch's FSDP2-based `replicate`), else None."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be an FSDP module yet
    return model if fsdp is not None and isinstance(model, fsdp.FSDPModule) else None
