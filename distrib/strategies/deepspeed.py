"""DeepSpeed ZeRO (stages 0-3, CPU offload) behind the same user loop. Needs `distrib[deepspeed]`.

`prepare(model, optimizer, loader)` builds one `DeepSpeedEngine` with `deepspeed.initialize` from the
config that `_deepspeed_config.build_config` completes. The model returned is the engine (call it as the
model; `unwrap_model` gives the user's module), the optimizer returned maps `step()`/`zero_grad()` onto
the engine (`_deepspeed_engine.EngineOptimizer`). Schedulers stay distrib's: they are not handed to
DeepSpeed, and advance once per real optimizer step like under every other strategy.

Accumulation: DeepSpeed's `gradient_accumulation_steps` equals distrib's; before each backward the
engine's accumulation boundary is set from distrib's window (`set_gradient_accumulation_boundary`), the
loss (already divided by the window by `distrib.backward`) is not divided again (`scale_wrt_gas=False`),
and `engine.step()` runs once per window. Gradient clipping is DeepSpeed's own, inside `step()`, at the
configured `gradient_clipping`.

The module imports DeepSpeed only when a run uses it, so importing it never needs the package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import _build_lock, _compile, _precision
from ..errors import PrecisionError, PrepareError, TrainingError, missing_extra
from . import _deepspeed_config, _defaults, _process_group
from ._deepspeed_engine import CHECKPOINT_WORLD_SIZE_DEPENDENT as CHECKPOINT_WORLD_SIZE_DEPENDENT
from ._deepspeed_engine import EngineOptimizer
from ._deepspeed_engine import full_state_dict as full_state_dict
from ._deepspeed_engine import load_training_state as load_training_state
from ._deepspeed_engine import save_training_state as save_training_state
from ._defaults import check_model as check_model
from ._defaults import teardown as teardown
from ._process_group import collective_device as collective_device

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._precision import PrecisionPlan
    from .._runtime import Runtime
    from .._settings import Settings

NAME = "deepspeed"

_PURPOSE = "strategy='deepspeed'"


@dataclass(eq=False)
class DeepSpeedState:
    """The strategy's own state: the engines built by `prepare` and the configs they were built with."""

    engines: list[Any] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)
    optimizers: list[EngineOptimizer] = field(default_factory=list)
    no_sync_depth: int = 0


def is_available() -> bool:
    return torch.distributed.is_available() and importlib.util.find_spec("deepspeed") is not None


def unavailable_reason() -> str:
    if not torch.distributed.is_available():
        return "this build of torch has no torch.distributed support, which DeepSpeed needs."
    return str(missing_extra("deepspeed", "deepspeed", _PURPOSE))


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:
        raise missing_extra("deepspeed", "deepspeed", _PURPOSE) from exc
    return deepspeed


# CUDA by local rank when present, else the CPU (DeepSpeed's CPU accelerator, over gloo)
choose_device = _process_group.choose_cuda_or_cpu


def init_process_group(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    """Create torch's group (one process included); DeepSpeed's communication layer adopts it."""
    return _process_group.init_process_group_always(env, settings, device)


def precision_plan(settings: Settings, device: torch.device) -> PrecisionPlan:
    """DeepSpeed's engine holds the weights in the low-precision dtype (its "bf16"/"fp16" config, filled
    from this plan) and scales fp16 losses itself; floating inputs are cast to that dtype, no autocast."""
    if settings.mixed_precision == "fp16" and device.type == "cpu":
        raise PrecisionError(
            "DeepSpeed cannot train in fp16 on the CPU (its fp16 optimizer needs a GPU); use "
            "mixed_precision='bf16', or strategy='ddp' for fp16 with loss scaling on the CPU."
        )
    return _precision.parameter_plan(settings.mixed_precision, device, scaler=None, cast_inputs=True)


def setup(runtime: Runtime) -> DeepSpeedState:
    """Import DeepSpeed and attach its communication layer to the process group.

    The first run on a machine compiles DeepSpeed's shared-memory communication op with the C++
    compiler (about 30 s; cached under ~/.cache/torch_extensions afterwards).
    """
    deepspeed = _import_deepspeed()
    _build_lock.check_before_build(runtime)  # a lock left by an interrupted build would hang init forever
    deepspeed.init_distributed(
        dist_backend=_process_group.backend_for(runtime.device), dist_init_required=False
    )
    return DeepSpeedState()


def _state(runtime: Runtime) -> DeepSpeedState:
    state = runtime.state.strategy_state
    assert isinstance(state, DeepSpeedState), "the DeepSpeed strategy's state is set up by distributed()"
    return state


def _micro_batch_size(runtime: Runtime) -> int | None:
    """The per-process batch size of the first prepared dataloader, if one was prepared."""
    for loader in runtime.state.dataloaders:
        source = getattr(loader, "source", loader)
        size = getattr(source, "batch_size", None)
        if size is not None:
            return int(size) // runtime.world_size if runtime.settings.split_batches else int(size)
    return None


def _pair(models: list[nn.Module], optimizers: list[Any]) -> dict[int, Any]:
    """Model index -> the optimizer that updates its parameters."""
    pairs: dict[int, Any] = {}
    for optimizer in optimizers:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        owners = [i for i, m in enumerate(models) if any(id(p) in ids for p in m.parameters())]
        if not owners:
            raise PrepareError(
                "prepare() got an optimizer without its model; under DeepSpeed pass the model and its "
                "optimizer to the same prepare() call: prepare(model, optimizer, loader)."
            )
        pairs[owners[0]] = optimizer
    return pairs


def prepare_training(
    runtime: Runtime, models: list[nn.Module], optimizers: list[Any], schedulers: list[Any]
) -> tuple[list[Any], list[Any], list[Any]]:
    """Build the DeepSpeed engine for the model that trains; other models are only placed."""
    state = _state(runtime)
    pairs = _pair(models, optimizers)
    trained = [i for i in range(len(models)) if i in pairs or _config_has_optimizer(runtime)]
    if len(trained) + len(state.engines) > 1:
        raise PrepareError(
            "DeepSpeed trains one model per run (one engine); prepare a single model with its optimizer, "
            "and keep frozen helper models out of the optimizer."
        )
    out_models: list[Any] = []
    out_optimizers: list[Any] = []
    for i, model in enumerate(models):
        if i not in trained:
            out_models.append(_place_frozen(runtime, model))
            continue
        engine = _build_engine(runtime, model, pairs.get(i), has_scheduler=bool(schedulers))
        out_models.append(engine)
        if i in pairs:
            out_optimizers.append(_wrap_optimizer(runtime, engine))
    return out_models, out_optimizers, schedulers


def _place_frozen(runtime: Runtime, model: nn.Module) -> nn.Module:
    """A model without an optimizer gets no engine; it computes in the plan's dtype like the trained one."""
    dtype = runtime.precision.param_dtype
    if dtype is not None:
        model.to(dtype=dtype)
    return _defaults.place_model(runtime, model)


def _config_has_optimizer(runtime: Runtime) -> bool:
    return "optimizer" in _deepspeed_config.load_config(runtime.settings.deepspeed.config)


def _build_engine(runtime: Runtime, model: nn.Module, optimizer: Any, *, has_scheduler: bool) -> Any:
    _check_materialized(model)
    _precision.convert(runtime, model)
    _compile.apply(runtime, model)
    config = _deepspeed_config.build_config(
        runtime.settings.deepspeed,
        runtime.settings,
        world_size=runtime.world_size,
        micro_batch_size=_micro_batch_size(runtime),
        has_optimizer=optimizer is not None,
        has_scheduler=has_scheduler,
    )
    deepspeed = _import_deepspeed()
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # built under zero.Init
    if runtime.settings.device_placement and not partitioned:
        model = model.to(runtime.device)
    parameters = None if optimizer is not None else [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=parameters, config=config, dist_init_required=False
    )
    state = _state(runtime)
    state.engines.append(engine)
    state.configs.append(config)
    return _precision.wrap_forward(runtime, engine)


def _check_materialized(model: nn.Module) -> None:
    if any(p.is_meta and not hasattr(p, "ds_id") for p in model.parameters()):
        raise PrepareError(
            "prepare() got a model on the meta device; DeepSpeed cannot partition parameters that hold no "
            "data. Build large models for ZeRO-3 under `deepspeed.zero.Init(config_dict_or_path=...)`, "
            "or on the CPU, or use strategy='fsdp', which materialises meta-device models."
        )


def _wrap_optimizer(runtime: Runtime, engine: Any) -> EngineOptimizer:
    optimizer = EngineOptimizer(engine, runtime)
    _state(runtime).optimizers.append(optimizer)
    return optimizer


def engine_optimizer(model: Any) -> EngineOptimizer:
    """The prepared optimizer of a DeepSpeed engine whose optimizer the DeepSpeed config created.

    Use it when the config has an "optimizer" section and you passed no torch optimizer to `prepare`.
    Example::

        model, loader = prepare(model, loader)       # the config names {"optimizer": {"type": "AdamW"}}
        optimizer = engine_optimizer(model)
    """
    from .._runtime import current

    runtime = current("engine_optimizer")
    state = _state(runtime)
    for optimizer in state.optimizers:
        if optimizer.engine is model:
            return optimizer
    if model not in state.engines:
        raise PrepareError("engine_optimizer() needs the model returned by prepare() under DeepSpeed.")
    optimizer = _wrap_optimizer(runtime, model)
    runtime.state.optimizers.append(optimizer)
    return optimizer


def _engine(runtime: Runtime) -> Any:
    state = _state(runtime)
    if not state.engines:
        raise TrainingError(
            "backward() under DeepSpeed needs a prepared model with an optimizer; call "
            "prepare(model, optimizer, loader) first."
        )
    return state.engines[0]


def backward(runtime: Runtime, loss: torch.Tensor, **kwargs: Any) -> None:
    """`engine.backward(loss)` with the accumulation boundary taken from distrib's window."""
    unknown = set(kwargs) - {"retain_graph"}
    if unknown:
        raise TrainingError(
            f"backward() under DeepSpeed accepts only retain_graph=..., not {', '.join(sorted(unknown))}."
        )
    engine = _engine(runtime)
    engine.set_gradient_accumulation_boundary(runtime.sync_gradients and not _state(runtime).no_sync_depth)
    engine.backward(loss, retain_graph=bool(kwargs.get("retain_graph", False)), scale_wrt_gas=False)


@contextlib.contextmanager
def no_sync(runtime: Runtime, model: nn.Module) -> Iterator[None]:
    """Backward passes in the block are not accumulation boundaries (no step, no final reduction)."""
    state = _state(runtime)
    state.no_sync_depth += 1
    try:
        yield
    finally:
        state.no_sync_depth -= 1


@contextlib.contextmanager
def sync_now(runtime: Runtime, model: nn.Module) -> Iterator[None]:
    """DeepSpeed reduces gradients on its own schedule, at the accumulation boundary only."""
    raise TrainingError(
        "trigger_sync_in_backward() is not available under DeepSpeed, which reduces gradients at the end "
        "of each accumulation window only (ZeRO owns the gradient buffers); drop it, or use strategy='ddp' "
        "or 'fsdp' (or sync_each_batch=True there)."
    )
    yield  # pragma: no cover - a generator, for the contextmanager decorator


def clip_grad_norm_(
    runtime: Runtime, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float
) -> torch.Tensor:
    """DeepSpeed clips inside `optimizer.step()` at the configured `gradient_clipping`.

    This checks that `max_norm` is that value and returns the norm DeepSpeed measured at the previous
    optimizer step (NaN before the first), as DeepSpeed computes the norm only inside `step()`.
    """
    engine = _engine(runtime)
    configured = float(engine.gradient_clipping() or 0.0)
    if configured == 0.0 and norm_type == 2.0 and max_norm > 0:
        configured = _adopt_clipping(engine, max_norm)
    if norm_type != 2.0 or abs(configured - max_norm) > 1e-12:
        raise TrainingError(
            f"under DeepSpeed, gradients are clipped inside optimizer.step() at the configured "
            f"gradient_clipping={configured} (L2 norm); clip_grad_norm_(max_norm={max_norm}, "
            f"norm_type={norm_type}) cannot change that. Set DeepSpeedOptions(gradient_clipping={max_norm}) "
            "or gradient_clipping in the DeepSpeed config."
        )
    norm = engine.get_global_grad_norm()
    return torch.tensor(float("nan") if norm is None else float(norm))


def _adopt_clipping(engine: Any, max_norm: float) -> float:
    """No clipping was configured: clip at `max_norm` from the next step on, so the plain loop's
    `clip_grad_norm_(params, max_norm)` keeps its meaning (DeepSpeed reads the value at each step; its ZeRO
    and bf16 optimizers keep their own copy)."""
    engine._config.gradient_clipping = max_norm
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = max_norm
    return float(engine.gradient_clipping())


def replicated_tensors(runtime: Runtime) -> Iterable[tuple[str, torch.Tensor]]:
    """The module's weights under ZeRO 0-2 (every rank holds them whole); none under ZeRO-3 (partitioned)."""
    engines = _state(runtime).engines
    if any(engine.zero_optimization_partition_weights() for engine in engines):
        return ()
    return _defaults.replicated_tensors(runtime)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DeepSpeed engine (`engine.module`)."""
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module  # type: ignore[no-any-return]
    return model
