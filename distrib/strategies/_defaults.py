"""The implementations most strategies share; a strategy module re-exports the ones it uses
(`from ._defaults import teardown as teardown`) and defines the rest itself."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from .. import _compile, _precision, _replicas
from ..errors import PrepareError

if TYPE_CHECKING:
    from .._precision import PrecisionPlan
    from .._runtime import Runtime
    from .._settings import Settings

CHECKPOINT_WORLD_SIZE_DEPENDENT = False


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def precision_plan(settings: Settings, device: torch.device) -> PrecisionPlan:
    """Autocast around the forward in the setting's dtype; a `GradScaler` for fp16 (CPU included)."""
    return _precision.autocast_plan(settings.mixed_precision, device)


def setup(runtime: Runtime) -> None:
    return None


def teardown(runtime: Runtime) -> None:
    """Nothing to release beyond the process group, which the scope owns."""


def check_model(model: torch.nn.Module) -> None:
    """Refuse models a backend already wrapped: distrib must do the wrapping to own sync and state."""
    wrapped = _wrapped_by(model)
    if wrapped is not None:
        raise PrepareError(
            f"prepare() got a model already wrapped {wrapped}; pass the plain module and let distrib wrap it "
            "(the strategy and its options choose how)."
        )


def _wrapped_by(model: torch.nn.Module) -> str | None:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "in DistributedDataParallel (pass model.module)"
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(model, getattr(fsdp, "FSDPModule", ())):
        return "by fully_shard() (FSDP2)"
    if fsdp is not None and isinstance(model, getattr(fsdp, "FullyShardedDataParallel", ())):
        return "in FullyShardedDataParallel (FSDP1)"
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, getattr(deepspeed, "DeepSpeedEngine", ())):
        return "in a DeepSpeed engine (pass engine.module)"
    return None


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


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself (strategies that wrap override this)."""
    return model


def replicated_tensors(runtime: Runtime) -> Iterable[tuple[str, torch.Tensor]]:
    """Every rank holds the whole model: all its parameters and buffers (batch-norm statistics aside)."""
    return _replicas.model_tensors(runtime)


def place_model(runtime: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """Convert (fp8), move the model to the run's device (when device placement is on), compile it (the
    `compile` setting), add the plan's forward."""
    _precision.convert(runtime, model)
    if runtime.settings.device_placement:
        model = model.to(runtime.device)
    _compile.apply(runtime, model)
    return _precision.wrap_forward(runtime, model)
