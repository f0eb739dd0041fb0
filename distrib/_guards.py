"""Checks that turn silent training mistakes into errors, each done once: at `prepare` or the first step.

* A stale optimizer: one that still holds parameters a strategy replaced when it prepared the model (FSDP2
  swaps every parameter for a sharded one), so stepping it trains nothing.
* An optimizer that holds none of the prepared models' parameters.
* An optimizer, or an LR scheduler, that was not passed to `prepare` while gradients are accumulated: it
  would step on every micro-batch.
* `loss.backward()` instead of `backward(loss)` where that matters: under gradient accumulation (the loss
  must be divided by the window), with fp16 loss scaling, or where the strategy runs backward itself.

Prepared optimizers run `first_step` on their first `step()` call. Optimizers that were not prepared are
seen through torch's global optimizer step pre-hook, installed by `prepare` and removed after the first
few optimizer steps of the run (or when the scope closes), so no check stays on the per-step path.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import PrepareError, TrainingError

if TYPE_CHECKING:
    from ._runtime import Runtime

#: strategies whose optimizers step DeepSpeed's own partitions (their param groups are not model tensors)
_OWN_PARAMETER_GROUPS = ("deepspeed",)


def parameter_ids(models: Iterable[torch.nn.Module]) -> set[int]:
    return {id(p) for model in models for p in model.parameters()}


def parameters_before(models: Iterable[torch.nn.Module]) -> list[weakref.ref[torch.Tensor]]:
    """Weak references to the models' parameters, taken before a strategy prepares them (in place)."""
    return [weakref.ref(p) for model in models for p in model.parameters()]


def record_replaced(
    runtime: Runtime, before: list[weakref.ref[torch.Tensor]], after: list[torch.nn.Module]
) -> None:
    """Remember the parameters a strategy replaced while preparing the models (`after` once prepared)."""
    current = parameter_ids(after)
    retired = runtime.state.retired_params
    for ref in before:
        param = ref()
        if param is not None and id(param) not in current:
            retired[id(param)] = ref


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _holds_retired(runtime: Runtime, params: list[torch.Tensor]) -> bool:
    retired = runtime.state.retired_params
    return any((ref := retired.get(id(p))) is not None and ref() is p for p in params)


def _name(optimizer: Any) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner).__name__


def _stale_error(optimizer: Any, runtime: Runtime) -> PrepareError:
    return PrepareError(
        f"the {_name(optimizer)} optimizer holds the parameters the model had before prepare(), which "
        f"strategy {runtime.strategy!r} replaced (FSDP2 shards each parameter into a new one): stepping it "
        "would train nothing. Pass the optimizer to prepare() together with the model, e.g. "
        "model, optimizer = prepare(model, optimizer), or create it from the prepared model's parameters."
    )


def check_prepared_optimizer(runtime: Runtime, optimizer: Any) -> None:
    """First step of a prepared optimizer: it must update the prepared models' current parameters."""
    if runtime.strategy in _OWN_PARAMETER_GROUPS or not runtime.state.models:
        return
    params = _optimizer_params(getattr(optimizer, "optimizer", optimizer))
    if _holds_retired(runtime, params):
        raise _stale_error(optimizer, runtime)
    current = parameter_ids(runtime.state.models)
    if params and not any(id(p) in current for p in params):
        raise PrepareError(
            f"the prepared {_name(optimizer)} optimizer holds none of the parameters of the prepared "
            f"model(s) ({', '.join(type(m).__name__ for m in runtime.state.models)}): it was built from another "
            "model, or from a copy. Build it from the model you prepare: optimizer = "
            "torch.optim.AdamW(model.parameters(), ...)."
        )


def check_backward_was_used(runtime: Runtime) -> None:
    """First step: `backward()` must have run where plain `loss.backward()` gives wrong gradients."""
    state = runtime.state
    if state.used_backward:
        return
    reasons = []
    if runtime.gradient_accumulation_steps > 1:
        reasons.append(
            f"gradient_accumulation_steps={runtime.gradient_accumulation_steps} (backward() divides the loss "
            "by the number of micro-batches in the window)"
        )
    if state.scaler is not None:
        reasons.append("fp16 loss scaling (backward() scales the loss)")
    if runtime.strategy in _OWN_PARAMETER_GROUPS:
        reasons.append(f"strategy {runtime.strategy!r} (its engine runs the backward pass)")
    has_grads = any(p.grad is not None for model in state.models for p in model.parameters())
    if reasons and has_grads:
        raise TrainingError(
            "the optimizer stepped after gradients were computed without distrib's backward(): replace "
            "loss.backward() by distrib.backward(loss). It matters here because of "
            + "; ".join(reasons)
            + "."
        )


def check_schedulers(runtime: Runtime, optimizer: Any) -> None:
    """First step: under accumulation, an LR scheduler of this optimizer must be a prepared one."""
    if runtime.gradient_accumulation_steps == 1:
        return
    prepared = {id(s.scheduler) for s in runtime.state.schedulers}
    targets = {id(optimizer), id(getattr(optimizer, "optimizer", optimizer))}
    for holder in (optimizer, getattr(optimizer, "optimizer", optimizer)):
        for owner in _referring_schedulers(holder):
            if id(owner.optimizer) in targets and id(owner) not in prepared:
                raise TrainingError(
                    f"the {type(owner).__name__} scheduler of the {_name(optimizer)} optimizer was not "
                    f"passed to prepare(): with gradient_accumulation_steps="
                    f"{runtime.gradient_accumulation_steps} it would advance on every micro-batch instead "
                    "of once per optimizer step. Prepare it too: scheduler = prepare(scheduler)."
                )


def _referring_schedulers(holder: Any) -> Iterable[Any]:
    """LR schedulers that hold `holder` (directly, or through their attribute dict); one heap scan each."""
    for obj in gc.get_referrers(holder):
        if _is_scheduler(obj):
            yield obj
        elif isinstance(obj, dict):
            yield from (owner for owner in gc.get_referrers(obj) if _is_scheduler(owner))


def _is_scheduler(obj: Any) -> bool:
    lr_scheduler = torch.optim.lr_scheduler
    kinds = (lr_scheduler.LRScheduler, getattr(lr_scheduler, "ReduceLROnPlateau", lr_scheduler.LRScheduler))
    return isinstance(obj, kinds) and hasattr(obj, "optimizer")


def first_step(runtime: Runtime, optimizer: Any) -> None:
    """Every check of a prepared optimizer's first `step()` call (a micro-step included)."""
    check_prepared_optimizer(runtime, optimizer)
    check_schedulers(runtime, optimizer)


def first_real_step(runtime: Runtime) -> None:
    """Checks that need gradients: the first step that closes an accumulation window."""
    check_backward_was_used(runtime)


# -- optimizers that were not prepared ---------------------------------------------------------------------

#: optimizer step calls the global hook watches before it removes itself
_WATCHED_STEPS = 8


class UnpreparedOptimizerWatch:
    """torch's global optimizer step pre-hook, for a while: an optimizer that updates a prepared model but
    was not prepared is stale (FSDP2) or steps on every micro-batch (accumulation)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = weakref.ref(runtime)
        self._seen: set[int] = set()
        self._calls = 0
        self._limit = _WATCHED_STEPS * max(1, runtime.gradient_accumulation_steps)
        self._handle: Any = register_optimizer_step_pre_hook(self)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._calls += 1
        runtime = self._runtime()
        if runtime is None or self._calls > self._limit:
            self.remove()
            return
        if id(optimizer) in self._seen:
            return
        self._seen.add(id(optimizer))
        prepared = {id(getattr(o, "optimizer", o)) for o in runtime.state.optimizers}
        if id(optimizer) not in prepared:
            _check_unprepared(runtime, optimizer)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _check_unprepared(runtime: Runtime, optimizer: torch.optim.Optimizer) -> None:
    params = _optimizer_params(optimizer)
    if _holds_retired(runtime, params):
        raise _stale_error(optimizer, runtime)
    if runtime.gradient_accumulation_steps > 1 and any(
        id(p) in parameter_ids(runtime.state.models) for p in params
    ):
        raise TrainingError(
            f"the {type(optimizer).__name__} optimizer updates a prepared model but was not passed to "
            f"prepare(): with gradient_accumulation_steps={runtime.gradient_accumulation_steps} it steps on "
            "every micro-batch. Prepare it: model, optimizer = prepare(model, optimizer)."
        )


def watch_unprepared_optimizers(runtime: Runtime) -> None:
    """Install the watch once per run (it removes itself after the first optimizer steps)."""
    if "optimizer_watch" in runtime.state.extensions:
        return
    watch = UnpreparedOptimizerWatch(runtime)
    runtime.state.extensions["optimizer_watch"] = watch
    runtime.call_on_close(watch.remove)
