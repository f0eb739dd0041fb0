"""The training-step functions: backward, accumulate, no_sync, gradient clipping."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from . import _replicas, _straggler
from ._precision import unscale_all
from ._runtime import Runtime, TrainingState, current
from .errors import TrainingError
from .strategies import GradientSyncControl


def backward(loss: torch.Tensor, **kwargs: Any) -> None:
    """`loss.backward()` done right for the run: scaled for accumulation, fp16 and the strategy.

    Inside `accumulate()`, the loss is divided by the number of micro-batches in the window, so k
    accumulated micro-batches give the gradients of one batch k times larger. Example::

        with accumulate(model):
            backward(loss_fn(model(x), y))
    """
    runtime = current("backward")
    if getattr(loss, "_distrib_pipeline_loss", False):
        runtime.state.used_backward = True  # through the schedule, window-scaled (distrib/parallel)
        return  # a pipelined model's loss: its schedule already ran the backward
    if loss.dim() != 0 and "gradient" not in kwargs:
        raise TrainingError(
            f"backward() needs a scalar loss, got a tensor of shape {tuple(loss.shape)}; reduce it first "
            "(e.g. loss.mean()), or pass gradient=... for a non-scalar backward."
        )
    state = runtime.state
    state.used_backward = True
    if state.sync_gradients and runtime.settings.check_replicas_every:
        _check_replicas(runtime)
    window = state.window_size
    if window > 1:
        loss = loss / window
    timer = runtime.state.extensions.get(_straggler.KEY)
    if timer is None:
        runtime.strategy_module.backward(runtime, loss, **kwargs)
    else:  # straggler_report_every is set: time the wait for gradient synchronisation
        timer.backward(runtime, loss, kwargs)


def _check_replicas(runtime: Runtime) -> None:
    """Every `check_replicas_every` windows, at the backward that closes the window: every rank passes here
    at the same point of its collective sequence (a rank that skipped `optimizer.step()` did not skip its
    backward), so the check never deadlocks on the very divergence it looks for."""
    state = runtime.state
    completed = (
        state.closing_backwards
    )  # windows finished before this one (N optimizer steps, if none skipped)
    state.closing_backwards += 1
    every = runtime.settings.check_replicas_every or 1
    if runtime.world_size > 1 and completed and completed % every == 0:
        _replicas.check(runtime, completed)


def _window_size(state: TrainingState, steps: int) -> int:
    """Micro-batches in the window starting now: `steps`, or fewer when the epoch ends sooner."""
    loader = state.active_dataloader
    remaining = (
        loader.remaining_in_epoch() if loader is not None and hasattr(loader, "remaining_in_epoch") else None
    )
    return steps if remaining is None else max(1, min(steps, remaining))


def accumulate(*models: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """Accumulate gradients over `gradient_accumulation_steps` micro-batches.

    On micro-steps that only accumulate, gradient synchronisation is skipped (`no_sync`) and the prepared
    optimizer's `step()`/`zero_grad()` do nothing. The window closes early on the last batch of the
    dataloader, so a length that is not a multiple of the steps loses nothing. Example::

        for x, y in loader:
            with accumulate(model):
                backward(loss_fn(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    """
    return _Accumulate(current("accumulate"), models)


class _Accumulate:
    """The `accumulate()` block; a plain class because it runs on every micro-batch."""

    __slots__ = ("_models", "_runtime", "_skip")

    def __init__(self, runtime: Runtime, models: tuple[torch.nn.Module, ...]) -> None:
        self._runtime = runtime
        self._models = models
        self._skip: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> None:
        runtime = self._runtime
        state = runtime.state
        if state.micro_step == 0:
            # [data] a resume on another number of processes may have changed the steps (TrainingState)
            steps = state.gradient_accumulation_steps or runtime.settings.gradient_accumulation_steps
            state.window_size = _window_size(state, steps)
        state.micro_step += 1
        state.in_accumulate = True
        loader = state.active_dataloader
        at_end = loader is not None and getattr(loader, "end_of_dataloader", False)
        state.sync_gradients = sync = state.micro_step >= state.window_size or at_end
        if not sync and self._models and not runtime.settings.sync_each_batch:
            self._skip = _skip_sync(runtime, self._models)
            self._skip.__enter__()

    def __exit__(self, *exc: object) -> None:
        state = self._runtime.state
        state.in_accumulate = False
        try:
            if self._skip is not None:
                self._skip.__exit__(*exc)  # type: ignore[arg-type]
        finally:
            self._skip = None
            if state.sync_gradients:
                state.micro_step = 0
                state.window_size = 1


@contextlib.contextmanager
def _skip_sync(runtime: Runtime, models: Iterable[torch.nn.Module]) -> Iterator[None]:
    module = runtime.strategy_module
    if not isinstance(module, GradientSyncControl):
        yield
        return
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(module.no_sync(runtime, model))
        yield


@contextlib.contextmanager
def trigger_sync_in_backward(model: torch.nn.Module) -> Iterator[None]:
    """Synchronise gradients in the backward passes of the block, even on an accumulation micro-step
    (inside `accumulate()` or `no_sync()`), e.g. to free memory or to read reduced gradients early.

    Use `sync_each_batch=True` to do it on every micro-batch. Not available under DeepSpeed, which reduces
    on its own schedule. Example::

        with accumulate(model):
            loss = loss_fn(model(x), y)
            with trigger_sync_in_backward(model):
                backward(loss)
    """
    runtime = current("trigger_sync_in_backward")
    module = runtime.strategy_module
    if runtime.world_size == 1 or not isinstance(module, GradientSyncControl):
        yield
        return
    with module.sync_now(runtime, model):
        yield


@contextlib.contextmanager
def join_uneven_inputs(models: torch.nn.Module | Iterable[torch.nn.Module]) -> Iterator[None]:
    """Let ranks with fewer batches finish early without hanging the others (torch's DDP `Join`).

    With `even_batches=False` the last batches are not padded, so ranks may see different numbers of
    batches; inside this block a rank that ran out shadows the others' gradient all-reduces until every
    rank is done. Works for models prepared under DDP (`strategy="ddp"`); other strategies need
    `even_batches=True`. Example::

        with distributed(even_batches=False):
            model, optimizer, loader = prepare(model, optimizer, loader)
            with join_uneven_inputs(model):
                for x, y in loader:
                    backward(loss_fn(model(x), y))
                    optimizer.step()
                    optimizer.zero_grad()
    """
    runtime = current("join_uneven_inputs")
    listed = [models] if isinstance(models, torch.nn.Module) else list(models)
    if runtime.world_size == 1:
        yield
        return
    from torch.distributed.algorithms.join import Join, Joinable

    joinables: list[Joinable] = [m for m in listed if isinstance(m, Joinable)]
    if runtime.strategy != "ddp" or not joinables:
        raise TrainingError(
            f"join_uneven_inputs() needs models prepared under strategy='ddp' (torch's Join works with "
            f"DistributedDataParallel), but this run uses {runtime.strategy!r} and got "
            f"{', '.join(type(m).__name__ for m in listed) or 'no model'}. Keep even_batches=True (the "
            "default) so every rank sees the same number of batches."
        )
    with Join(joinables):
        yield


@contextlib.contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Skip gradient synchronisation for backward passes in the block (no-op where not supported).

    Prefer `accumulate()`, which does this for you. Example::

        with no_sync(model):
            backward(loss)   # gradients stay local
    """
    runtime = current("no_sync")
    with _skip_sync(runtime, [model]):
        yield


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip the gradients' total norm (over all ranks' shards) and return the norm before clipping.

    Gradients are un-scaled first under fp16. On accumulation micro-steps, where gradients are not yet
    complete, nothing is clipped and the local norm is returned. Example::

        clip_grad_norm_(model.parameters(), max_norm=1.0)
    """
    runtime = current("clip_grad_norm_")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if not runtime.state.sync_gradients:
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, norm_type) if grads else torch.tensor(0.0)
    return runtime.strategy_module.clip_grad_norm_(runtime, params, max_norm, norm_type)


def clip_grad_value_(parameters: Iterable[torch.Tensor] | torch.Tensor, clip_value: float) -> None:
    """Clamp every gradient to [-clip_value, clip_value] (after un-scaling under fp16). Example::

    clip_grad_value_(model.parameters(), 0.5)
    """
    runtime = current("clip_grad_value_")
    if not runtime.state.sync_gradients:
        return
    unscale_all(runtime)
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    torch.nn.utils.clip_grad_value_(params, clip_value)


def optimizer_step_was_skipped() -> bool:
    """True when the last optimizer step was skipped (fp16 found inf/NaN gradients). Example::

    if not optimizer_step_was_skipped():
        ema.update(model)
    """
    return current("optimizer_step_was_skipped").state.optimizer_step_skipped
