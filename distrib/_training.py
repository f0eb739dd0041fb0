"""The training-step functions: backward, accumulate, no_sync, gradient clipping."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from . import _straggler, strategies
from ._precision import unscale_all
from ._runtime import Runtime, TrainingState, current
from .errors import TrainingError


def backward(loss: torch.Tensor, **kwargs: Any) -> None:
    """`loss.backward()` done right for the run: scaled for accumulation, fp16 and the strategy.

    Inside `accumulate()`, the loss is divided by the number of micro-batches in the window, so k
    accumulated micro-batches give the gradients of one batch k times larger. Example::

        with accumulate(model):
            backward(loss_fn(model(x), y))
    """
    runtime = current("backward")
    if loss.dim() != 0 and "gradient" not in kwargs:
        raise TrainingError(
            f"backward() needs a scalar loss, got a tensor of shape {tuple(loss.shape)}; reduce it first "
            "(e.g. loss.mean()), or pass gradient=... for a non-scalar backward."
        )
    window = runtime.state.window_size
    if window > 1:
        loss = loss / window
    timer = runtime.state.extensions.get(_straggler.KEY)
    if timer is None:
        runtime.strategy_module.backward(runtime, loss, **kwargs)
    else:  # straggler_report_every is set: time the wait for gradient synchronisation
        timer.backward(runtime, loss, kwargs)


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
            state.window_size = _window_size(state, runtime.settings.gradient_accumulation_steps)
        state.micro_step += 1
        loader = state.active_dataloader
        at_end = loader is not None and getattr(loader, "end_of_dataloader", False)
        state.sync_gradients = sync = state.micro_step >= state.window_size or at_end
        if not sync and self._models:
            self._skip = _skip_sync(runtime, self._models)
            self._skip.__enter__()

    def __exit__(self, *exc: object) -> None:
        state = self._runtime.state
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
    if not strategies.supports_no_sync(module):
        yield
        return
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(module.no_sync(runtime, model))
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
