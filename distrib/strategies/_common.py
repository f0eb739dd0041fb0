"""Pieces shared by the strategies that run on torch.distributed process groups (single, DDP, FSDP)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .. import _precision

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._runtime import Runtime
    from .._settings import Settings


def choose_device(env: ProcessEnvironment, settings: Settings) -> torch.device:
    """CUDA by local rank, else MPS (one process), else CPU; `cpu=True` forces the CPU."""
    if not settings.cpu and torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    mps = getattr(torch.backends, "mps", None)
    if not settings.cpu and env.world_size == 1 and mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """nccl for CUDA (with gloo for CPU tensors), gloo otherwise."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_process_group(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    """Create the default process group unless one exists or the job has one process."""
    if env.world_size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torchrun's agent already runs a store at MASTER_ADDR:MASTER_PORT; env:// joins it. Other launchers
    # (SLURM, MPI) have none, so rank 0 hosts one at the same address.
    init_method = "env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
    dist.init_process_group(
        backend=backend_for(device),
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=settings.timeout),
    )
    return True


def init_process_group_always(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    """Like `init_process_group`, but one process gets a group too (FSDP and DeepSpeed need one).

    The one-process group lives in an in-memory store, so it needs no address or port.
    """
    if dist.is_initialized():
        return False
    if env.world_size > 1:
        return init_process_group(env, settings, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend_for(device),
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=settings.timeout),
    )
    return True


def backward(runtime: Runtime, loss: torch.Tensor, **kwargs: Any) -> None:
    """`loss.backward()`, through the gradient scaler when fp16 needs one."""
    scaler = runtime.state.scaler
    if scaler is not None:
        loss = scaler.scale(loss)
    loss.backward(**kwargs)


def clip_grad_norm_(
    runtime: Runtime, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float
) -> torch.Tensor:
    """torch's clip, after un-scaling fp16 gradients so the threshold applies to the true norm."""
    _precision.unscale_all(runtime)
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)


def place_model(runtime: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """Move the model to the run's device (when device placement is on) and add autocast."""
    if runtime.settings.device_placement:
        model = model.to(runtime.device)
    return _precision.wrap_forward(runtime, model)


def teardown(runtime: Runtime) -> None:
    """Nothing to release beyond the process group, which the scope owns."""
