"""Mixed precision: one plan per run, built once by the strategy when the scope opens.

The `mixed_precision` setting is interpreted here and nowhere else. `DTYPES` is the one table of compute
dtypes; a `PrecisionPlan` says, for one strategy on one device, what runs in which dtype:

* `autocast_dtype`: the prepared model's forward runs under `torch.autocast` in this dtype (single, DDP,
  XLA, and FSDP2, whose policy casts only the inputs of its units); None for DeepSpeed, whose engine
  converts the whole module;
* `param_dtype`: the dtype a strategy that casts parameters itself keeps them in for compute (FSDP2's
  `MixedPrecisionPolicy`, DeepSpeed's bf16/fp16 engine);
* `cast_inputs`: floating-point inputs of the forward are cast to this dtype first (DeepSpeed, whose
  engine holds low-precision weights but does not cast what it is given);
* `make_scaler`: builds the fp16 gradient scaler (None when there is no loss scaling to do);
* `convert_module`: the module conversion applied before any wrapping or sharding (fp8 through torchao).

Prepared models return floating-point outputs in float32 whenever a plan lowers the precision, so losses
and metrics computed from them stay exact.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._runtime import current
from .errors import PrecisionError, missing_extra

if TYPE_CHECKING:
    from ._runtime import Runtime

#: the compute dtype of each setting (fp8 computes its non-matmul work in bf16; torchao owns the matmuls)
DTYPES: dict[str, torch.dtype | None] = {
    "no": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.bfloat16,
}
#: dtypes by their short names, for options such as `FSDPOptions.reduce_dtype`
NAMED_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPlan:
    """What runs in which dtype for one strategy on one device (see the module docstring)."""

    mixed_precision: str
    autocast_dtype: torch.dtype | None = None
    param_dtype: torch.dtype | None = None
    cast_inputs: torch.dtype | None = None
    make_scaler: Callable[[], Any] | None = None
    convert_module: Callable[[torch.nn.Module], None] | None = None

    @property
    def lowers_precision(self) -> bool:
        return DTYPES[self.mixed_precision] is not None


def autocast_plan(mixed_precision: str, device: torch.device) -> PrecisionPlan:
    """The plan of strategies that leave parameters in float32: autocast around the forward, a
    `GradScaler` for fp16 (also on the CPU), fp8 conversion through torchao."""
    dtype = DTYPES[mixed_precision]
    return PrecisionPlan(
        mixed_precision,
        autocast_dtype=dtype,
        make_scaler=_scaler_factory(mixed_precision, device),
        convert_module=fp8_converter(mixed_precision, device),
    )


def parameter_plan(
    mixed_precision: str,
    device: torch.device,
    *,
    scaler: Callable[[], Any] | None,
    cast_inputs: bool = False,
    autocast: bool = False,
) -> PrecisionPlan:
    """The plan of strategies that cast parameters themselves (FSDP2, DeepSpeed), with autocast only when
    the strategy asks for it."""
    dtype = DTYPES[mixed_precision]
    return PrecisionPlan(
        mixed_precision,
        autocast_dtype=dtype if autocast else None,
        param_dtype=dtype,
        cast_inputs=dtype if cast_inputs else None,
        make_scaler=scaler if mixed_precision == "fp16" else None,
        convert_module=fp8_converter(mixed_precision, device),
    )


def _scaler_factory(mixed_precision: str, device: torch.device) -> Callable[[], Any] | None:
    if mixed_precision != "fp16":
        return None
    return functools.partial(torch.amp.GradScaler, device.type)


def fp8_converter(mixed_precision: str, device: torch.device) -> Callable[[torch.nn.Module], None] | None:
    """torchao's float8 training conversion, after checking the device can run it; None unless fp8."""
    if mixed_precision != "fp8":
        return None
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise PrecisionError(
            f"mixed_precision='fp8' needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper); "
            f"this run uses {str(device)!r}. Use mixed_precision='bf16' instead."
        )
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise missing_extra("torchao", "fp8", "mixed_precision='fp8'") from None

    def convert(module: torch.nn.Module) -> None:
        convert_to_float8_training(module)

    return convert


def convert(runtime: Runtime, model: torch.nn.Module) -> None:
    """Apply the plan's module conversion (fp8) once, before the strategy wraps or shards `model`."""
    converter = runtime.precision.convert_module
    if converter is not None:
        converter(model)


def autocast_context(runtime: Runtime) -> contextlib.AbstractContextManager[Any]:
    dtype = runtime.precision.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=dtype)


@contextlib.contextmanager
def autocast() -> Iterator[None]:
    """Run the block under the scope's mixed precision (a no-op when it is "no", or when the strategy
    computes in low precision itself, as FSDP2 and DeepSpeed do).

    Prepared models already run their forward under it; use this for loss computations or for models you
    did not prepare. Example::

        with autocast():
            loss = loss_fn(model(x), y)
    """
    with autocast_context(current("autocast")):
        yield


def to_float32(obj: Any) -> Any:
    """Half-precision floating tensors in a nested structure, cast to float32."""
    return _cast_floating(obj, torch.float32, (torch.float16, torch.bfloat16))


def _cast_floating(obj: Any, dtype: torch.dtype, sources: tuple[torch.dtype, ...] | None) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.dtype != dtype and (sources is None or obj.dtype in sources):
            return obj.to(dtype)
        return obj
    if isinstance(obj, dict):
        return type(obj)((k, _cast_floating(v, dtype, sources)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        converted = [_cast_floating(v, dtype, sources) for v in obj]
        return type(obj)(*converted) if hasattr(obj, "_fields") else type(obj)(converted)
    return obj


class PrecisionForward:
    """The model's bound forward, run under the plan: inputs cast or autocast on, float32 outputs."""

    def __init__(self, forward: Callable[..., Any], device_type: str, plan: PrecisionPlan) -> None:
        self.original = forward
        self.device_type = device_type
        self.autocast_dtype = plan.autocast_dtype
        self.cast_inputs = plan.cast_inputs
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.cast_inputs is not None:
            args = _cast_floating(args, self.cast_inputs, None)
            kwargs = _cast_floating(kwargs, self.cast_inputs, None)
        if self.autocast_dtype is None:
            return to_float32(self.original(*args, **kwargs))
        with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype):
            out = self.original(*args, **kwargs)
        return to_float32(out)


def wrap_forward(runtime: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """Give `model` the plan's forward (an instance attribute) when the run lowers the precision."""
    plan = runtime.precision
    if plan.lowers_precision and not isinstance(model.__dict__.get("forward"), PrecisionForward):
        model.forward = PrecisionForward(model.forward, runtime.device.type, plan)  # type: ignore[method-assign]
    return model


def unwrap_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the forward added by `wrap_forward`, restoring the model's own."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), PrecisionForward):
            del module.forward
    return model


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
