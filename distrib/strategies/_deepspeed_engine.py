"""The prepared optimizer of a DeepSpeed engine, and the full state dict of a DeepSpeed model.

Checkpoints are DeepSpeed's own layout written through distrib's I/O (see `_deepspeed_checkpoint.py`,
re-exported here for the strategy module). `full_state_dict` gathers the whole model on rank 0: under ZeRO-3
in the training dtype (`DeepSpeedOptions.save_16bit_model=True`, the default) or as the fp32 master
weights (`False`); under ZeRO 0-2 the module already holds every weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._optim import PreparedOptimizer
from ..errors import TrainingError
from ._deepspeed_checkpoint import (
    CHECKPOINT_WORLD_SIZE_DEPENDENT,
    load_training_state,
    save_training_state,
)

if TYPE_CHECKING:
    from .._runtime import Runtime

__all__ = [
    "CHECKPOINT_WORLD_SIZE_DEPENDENT",
    "EngineOptimizer",
    "full_state_dict",
    "load_training_state",
    "save_training_state",
]


class EngineOptimizer(PreparedOptimizer):
    """The optimizer `prepare` returns under DeepSpeed: `step()` is `engine.step()` once per window.

    `param_groups` (and so learning-rate schedulers) act on DeepSpeed's optimizer, which wraps yours.
    Example::

        model, optimizer, loader = prepare(model, optimizer, loader)   # strategy="deepspeed"
        optimizer.step()        # engine.step(): reduce, clip, update, zero the gradients
    """

    def __init__(self, engine: Any, runtime: Runtime) -> None:
        super().__init__(engine.optimizer, runtime)
        self.engine = engine

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise TrainingError("optimizer.step(closure) is not supported under DeepSpeed; call step().")
        if self._checks_pending:
            self._first_steps()
        if not self._training.sync_gradients:
            return None
        self.engine.step()
        self._training.optimizer_step_skipped = not self.engine.was_step_applied()
        self._count_step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        # engine.step() already zeroes DeepSpeed's gradient partitions; this clears module gradients
        if self._training.sync_gradients:
            self.engine.zero_grad()

    def __repr__(self) -> str:
        return f"EngineOptimizer({type(self.engine.optimizer).__name__})"


def _engines(runtime: Runtime) -> list[Any]:
    return list(getattr(runtime.state.strategy_state, "engines", []))


def _engine_of(runtime: Runtime, model: nn.Module) -> Any:
    for engine in _engines(runtime):
        if model is engine or model is engine.module:
            return engine
    return None


def full_state_dict(runtime: Runtime, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unwrapped model's full state dict on rank 0 (None elsewhere); all ranks must call it."""
    engine = _engine_of(runtime, model)
    if engine is None:  # a model prepared without an optimizer: placed, not partitioned
        return _cpu_copy(model.state_dict()) if runtime.rank == 0 else None
    fp32 = not runtime.settings.deepspeed.save_16bit_model
    if engine.zero_optimization_partition_weights() and not fp32:
        state = engine._zero3_consolidated_16bit_state_dict()
        return dict(state) if runtime.rank == 0 else None
    return _gathered(runtime, engine.module, fp32=fp32)


def _gathered(runtime: Runtime, module: nn.Module, *, fp32: bool) -> dict[str, torch.Tensor] | None:
    """Parameter by parameter (a collective each under ZeRO, same order on every rank), then buffers."""
    values: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in values:
            values[id(param)] = _full_parameter(param, fp32=fp32)
        out[name] = values[id(param)]
    if runtime.rank != 0:
        return None
    state = module.state_dict()
    return {key: out[key] if key in out else state[key].detach().cpu() for key in state}


def _full_parameter(param: nn.Parameter, *, fp32: bool) -> torch.Tensor:
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param) if fp32 else None
    if value is None:
        with zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            value = param.detach().clone()
    return value.detach().cpu()


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
