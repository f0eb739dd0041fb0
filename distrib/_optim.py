"""Optimizer and scheduler wrappers that respect the accumulation window and skipped fp16 steps.

`step()` and `zero_grad()` act only on the micro-step that closes an accumulation window; the scheduler
advances exactly once per real optimizer step (never on accumulation micro-steps, never when fp16 loss
scaling skipped the step). Schedules are therefore written in optimizer steps:
`num_training_steps = len(prepared_loader) // gradient_accumulation_steps * epochs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from . import _guards

if TYPE_CHECKING:
    from ._runtime import Runtime


class PreparedOptimizer(torch.optim.Optimizer):
    """Wraps the user's optimizer; everything not overridden is forwarded to it."""

    def __init__(self, optimizer: torch.optim.Optimizer, runtime: Runtime) -> None:
        # deliberately no super().__init__: the wrapped optimizer owns the parameter groups and state
        self.optimizer = optimizer
        self._runtime = runtime
        self._training = runtime.state
        self._scaler = runtime.state.scaler
        self._checks_pending = 2  # the first call, then the first call that closes a window

    def _first_steps(self) -> None:
        """The once-per-run checks of `_guards` (misuse that would otherwise train silently wrong)."""
        if self._checks_pending == 2:
            _guards.first_step(self._runtime, self)
            self._checks_pending = 1
        if self._training.sync_gradients:
            _guards.first_real_step(self._runtime)
            self._checks_pending = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        if self._checks_pending:
            self._first_steps()
        if not self._training.sync_gradients:
            return None
        if self._scaler is None:
            self._training.optimizer_step_skipped = False
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            self._count_step()
            return result
        scale = self._scaler.get_scale()
        self._scaler.step(self.optimizer)
        self._scaler.update()
        self._training.optimizer_step_skipped = self._scaler.get_scale() < scale
        self._count_step()
        return None

    def _count_step(self) -> None:
        """`optimizer_steps` counts the real steps of the first prepared optimizer (one per window)."""
        training = self._training
        if not training.optimizer_step_skipped and training.optimizers and training.optimizers[0] is self:
            training.optimizer_steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._training.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the wrapper lacks (e.g. train()/eval() of schedule-free optimizers)
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"PreparedOptimizer({self.optimizer!r})"


class PreparedScheduler:
    """Wraps an LR scheduler so it advances once per real optimizer step."""

    def __init__(self, scheduler: Any, runtime: Runtime) -> None:
        self.scheduler = scheduler
        self._training = runtime.state

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self._training.sync_gradients or self._training.optimizer_step_skipped:
            return
        self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scheduler.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def get_last_lr(self) -> list[float]:
        return list(self.scheduler.get_last_lr())

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"PreparedScheduler({self.scheduler!r})"
