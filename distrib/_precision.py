"""Mixed precision: autocast around the model's forward, fp16 gradient scaling, fp8 through torchao."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ._runtime import current
from .errors import PrecisionError, missing_extra

if TYPE_CHECKING:
    from ._runtime import Runtime

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_supported(mixed_precision: str, device: torch.device) -> None:
    """Raise `PrecisionError` naming the fix when `device` cannot run `mixed_precision`."""
    if mixed_precision == "fp16" and device.type not in ("cuda", "xla", "xpu", "npu", "hpu"):
        raise PrecisionError(
            f"mixed_precision='fp16' needs a GPU, but this run uses device {str(device)!r}: fp16 autocast "
            "with loss scaling is not supported here. Use mixed_precision='bf16' (supported on CPU and "
            "recent GPUs) or 'no'."
        )
    if mixed_precision == "fp8":
        _check_fp8(device)


def _check_fp8(device: torch.device) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise PrecisionError(
            f"mixed_precision='fp8' needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper); "
            f"this run uses {str(device)!r}. Use mixed_precision='bf16' instead."
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise missing_extra("torchao", "fp8", "mixed_precision='fp8'") from None


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype autocast computes in (bf16 also for fp8, whose matmuls torchao handles)."""
    if mixed_precision == "fp8":
        return torch.bfloat16
    return _DTYPES.get(mixed_precision)


def autocast_context(runtime: Runtime) -> contextlib.AbstractContextManager[Any]:
    dtype = autocast_dtype(runtime.mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=dtype)


@contextlib.contextmanager
def autocast() -> Iterator[None]:
    """Run the block under the scope's mixed precision (a no-op when it is "no").

    Prepared models already run their forward under it; use this for loss computations or for models you
    did not prepare. Example::

        with autocast():
            loss = loss_fn(model(x), y)
    """
    with autocast_context(current("autocast")):
        yield


def to_float32(obj: Any) -> Any:
    """Half-precision floating tensors in a nested structure, cast to float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in (torch.float16, torch.bfloat16) else obj
    if isinstance(obj, dict):
        return type(obj)((k, to_float32(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        converted = [to_float32(v) for v in obj]
        return type(obj)(*converted) if hasattr(obj, "_fields") else type(obj)(converted)
    return obj


class _AutocastForward:
    """The model's bound forward, run under autocast with outputs cast back to float32."""

    def __init__(self, forward: Callable[..., Any], device_type: str, dtype: torch.dtype) -> None:
        self.original = forward
        self.device_type = device_type
        self.dtype = dtype
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            out = self.original(*args, **kwargs)
        return to_float32(out)


def wrap_forward(runtime: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """Give `model` an autocast forward (instance attribute) when the run uses mixed precision."""
    dtype = autocast_dtype(runtime.mixed_precision)
    if runtime.mixed_precision == "fp8":
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model)
    if dtype is not None and not isinstance(model.__dict__.get("forward"), _AutocastForward):
        model.forward = _AutocastForward(model.forward, runtime.device.type, dtype)  # type: ignore[method-assign]
    return model


def unwrap_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the autocast forward added by `wrap_forward`, restoring the model's own."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _AutocastForward):
            del module.forward
    return model


def make_scaler(runtime: Runtime) -> Any:
    """A gradient scaler for fp16 runs, else None."""
    if runtime.mixed_precision != "fp16":
        return None
    return torch.amp.GradScaler(runtime.device.type)


def unscale_all(runtime: Runtime) -> None:
    """Un-scale every prepared optimizer's gradients (once per step) before clipping."""
    scaler = runtime.state.scaler
    if scaler is None:
        return
    for optimizer in runtime.state.optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)
        stage = scaler._per_optimizer_states[id(inner)]["stage"]
        if stage.name == "READY":
            scaler.unscale_(inner)
