"""Fully sharded data parallel with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Parameters, gradients and optimizer state are sharded over the ranks (see `FSDPOptions` for the modes).
`prepare` shards each model in place: the returned model is the user's own object (FSDP2 changes its
class to add the hooks), its parameters are DTensors holding this rank's shard. Optimizers built before
`prepare` are re-pointed at the sharded parameters; models built on the meta device are materialised
shard by shard. Gradient clipping works on the global norm over all shards, accumulation micro-steps skip
the reduce-scatter, and checkpoints go through torch.distributed.checkpoint (see `_fsdp_checkpoint.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import _compile, _precision
from ..parallel import _checkpoint as _parallel_checkpoint
from ..parallel import _clip, _compose
from . import _defaults, _fsdp_params, _fsdp_wrap, _process_group
from ._defaults import backward as backward
from ._defaults import check_model as check_model
from ._defaults import teardown as teardown
from ._fsdp_checkpoint import CHECKPOINT_WORLD_SIZE_DEPENDENT as CHECKPOINT_WORLD_SIZE_DEPENDENT
from ._fsdp_checkpoint import full_state_dict as full_state_dict
from ._fsdp_checkpoint import load_training_state as load_training_state
from ._fsdp_checkpoint import save_training_state as save_training_state
from ._process_group import collective_device as collective_device

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from .._environment import ProcessEnvironment
    from .._precision import PrecisionPlan
    from .._runtime import Runtime
    from .._settings import Settings

NAME = "fsdp"


@dataclass(eq=False)
class FSDPState:
    """The strategy's own state (`runtime.state.strategy_state`): the mesh and the parameter map."""

    mesh: DeviceMesh
    param_map: _fsdp_params.ParamMap = field(default_factory=dict)


def is_available() -> bool:
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reason() -> str:
    return (
        "FSDP2 needs torch.distributed and torch.distributed.fsdp.fully_shard (torch >= 2.6); "
        f"this torch is {torch.__version__}. Upgrade torch, or use strategy='ddp'."
    )


# CUDA by local rank when present, else the CPU (FSDP does not run on MPS)
choose_device = _process_group.choose_cuda_or_cpu


def init_process_group(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    """FSDP needs a process group even for one process (its device mesh is built on one)."""
    return _process_group.init_process_group_always(env, settings, device)


def precision_plan(settings: Settings, device: torch.device) -> PrecisionPlan:
    """FSDP2 casts parameters to the plan's dtype (`MixedPrecisionPolicy`); autocast stays on around the
    forward, because the policy casts only unit inputs: modules kept in float32 (batch norms, see
    `_fsdp_wrap`) hand float32 activations to low-precision neighbours, and precision-sensitive ops
    (softmax, norms, losses) stay float32 as under DDP. fp16 loss scaling must agree over the ranks, each
    of which sees only its gradient shards: `ShardedGradScaler`."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return _precision.parameter_plan(
        settings.mixed_precision, device, scaler=lambda: ShardedGradScaler(device.type), autocast=True
    )


def setup(runtime: Runtime) -> FSDPState:
    if runtime.parallel is not None:  # N-D parallelism: the data-shard (x replicate) part of the one mesh
        return FSDPState(mesh=fsdp_mesh(runtime))
    options = runtime.settings.fsdp
    mesh = _fsdp_wrap.build_mesh(options, runtime.world_size, runtime.local_world_size, runtime.device.type)
    return FSDPState(mesh=mesh)


def fsdp_mesh(runtime: Runtime) -> DeviceMesh:
    """Under N-D parallelism: shard over dp_shard (x cp), replicate over dp_replicate when it is > 1."""
    assert runtime.parallel is not None
    return runtime.parallel.submesh("fsdp")


def _state(runtime: Runtime) -> FSDPState:
    state = runtime.state.strategy_state
    assert isinstance(state, FSDPState), "the FSDP strategy's state is set up by distributed()"
    return state


def prepare_training(
    runtime: Runtime, models: list[nn.Module], optimizers: list[Any], schedulers: list[Any]
) -> tuple[list[nn.Module], list[Any], list[Any]]:
    """Shard each model in place, then point the optimizers at the sharded parameters."""
    state = _state(runtime)
    for model in models:
        _compose.split_for_pipeline(runtime, model)  # N-D parallelism: this rank's pipeline stage
        shard(runtime, model, state)
    # optimizers prepared in an earlier call too: prepare(optimizer) may come before prepare(model)
    earlier = [getattr(o, "optimizer", o) for o in runtime.state.optimizers]
    _compose.repoint_optimizers(runtime, [*optimizers, *earlier], state.param_map)
    return [_compose.wrap_pipeline(runtime, m) for m in models], optimizers, schedulers


def shard(runtime: Runtime, model: nn.Module, state: FSDPState) -> nn.Module:
    """Shard `model` in place with `fully_shard` (materialising it if it was built on meta); the precision
    plan's module conversion (fp8) comes first, as torchtitan orders it."""
    options = runtime.settings.fsdp
    layout = _fsdp_params.meta_layout(model)
    rank0_state = model.state_dict() if layout == "rank0" and runtime.rank == 0 else None
    if layout == "none" and runtime.settings.device_placement and not options.cpu_offload:
        model.to(runtime.device)
    if layout == "none" and runtime.world_size > 1 and runtime.pp_size == 1:  # pipeline stages differ
        _fsdp_params.sync_initial_weights(model, runtime.collective_device)
    _precision.convert(runtime, model)
    before = _fsdp_params.names_by_id(model)
    _compose.apply_tensor_parallel(runtime, model)  # N-D parallelism: TP after fp8, before AC/compile/FSDP
    _fsdp_wrap.shard_model(
        model,
        mesh=state.mesh,
        options=options,
        mp_policy=_fsdp_wrap.mixed_precision_policy(runtime.precision.param_dtype, options.reduce_dtype),
        compile_units=lambda root, units: _compile.apply(runtime, root, units),
        device_type=runtime.device.type,
    )
    if layout != "none":
        device = torch.device("cpu") if options.cpu_offload else runtime.device
        _fsdp_params.materialize(model, layout, device, rank0_state)
    _fsdp_params.update_param_map(state.param_map, before, model)
    return _precision.wrap_forward(runtime, model)


@contextlib.contextmanager
def no_sync(runtime: Runtime, model: nn.Module) -> Iterator[None]:
    """Accumulate unsharded local gradients without reduce-scatter until the block ends."""
    model = _compose.no_sync_target(model)  # N-D parallelism: a pipeline's stage module
    if not isinstance(model, torch.distributed.fsdp.FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def sync_now(runtime: Runtime, model: nn.Module) -> Iterator[None]:
    """Reduce-scatter in the backward passes of the block, inside `no_sync` too."""
    if not isinstance(model, torch.distributed.fsdp.FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(True)
    try:
        yield
    finally:
        if not runtime.sync_gradients:
            model.set_requires_gradient_sync(False)


def replicated_tensors(runtime: Runtime) -> Iterable[tuple[str, torch.Tensor]]:
    """None: every rank holds different shards; FSDP's own collectives keep the whole consistent."""
    return ()


def clip_grad_norm_(
    runtime: Runtime, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float
) -> torch.Tensor:
    """Clip by the global norm over every rank's gradient shards; returns that norm (a plain tensor)."""
    if _parallel_checkpoint.uses_dcp(runtime):  # N-D parallelism: gradients on several meshes, stages
        return _clip.clip_grad_norm_(runtime, parameters, max_norm, norm_type)
    total = _defaults.clip_grad_norm_(runtime, parameters, max_norm, norm_type)
    full = getattr(total, "full_tensor", None)
    return full() if callable(full) else total


def unwrap_model(model: nn.Module) -> nn.Module:
    return _compose.unwrap(model)  # N-D parallelism: the stage inside a pipelined model
