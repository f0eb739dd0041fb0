"""The strategy contract: what every module in `distrib/strategies/` provides, checked by mypy.

A strategy is a module. `Strategy` lists what every one defines; mypy checks each registered module against
it (see `strategies/__init__.py`), and `_defaults.py` holds the implementations most of them share, which a
module re-exports (`from ._defaults import teardown as teardown`). Optional abilities are small protocols of
their own, found with `isinstance(module, ...)`: a module opts in by defining the function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._precision import PrecisionPlan
    from .._runtime import Runtime
    from .._settings import Settings
    from ..checkpointing._reader import CheckpointReader
    from ..checkpointing._writer import CheckpointWriter


class Strategy(Protocol):
    """What the free functions need from a backend. All functions take the runtime first where they act
    on a run; none may be called before `setup`, except the ones that build the runtime."""

    #: the name users choose it by (`strategy="ddp"`)
    NAME: str
    #: True when a checkpoint can only be loaded with the number of processes that saved it
    CHECKPOINT_WORLD_SIZE_DEPENDENT: bool

    # -- availability and the process ---------------------------------------------------------------
    def is_available(self) -> bool: ...
    def unavailable_reason(self) -> str:
        """How to make the strategy available (an install command, a torch version, ...)."""
        ...

    def choose_device(self, env: ProcessEnvironment, settings: Settings) -> torch.device: ...
    def collective_device(self, device: torch.device) -> torch.device:
        """Where the tensors of collectives must live when the run uses `device`."""
        ...

    def init_process_group(self, env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
        """Create the default process group when needed; True when this call created it."""
        ...

    def precision_plan(self, settings: Settings, device: torch.device) -> PrecisionPlan:
        """What runs in which dtype (raises `PrecisionError` for a precision the backend cannot run)."""
        ...

    def setup(self, runtime: Runtime) -> Any:
        """The strategy's own state for this run (`runtime.state.strategy_state`)."""
        ...

    def teardown(self, runtime: Runtime) -> None: ...

    # -- preparing and training ---------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise `PrepareError` for a model `prepare` cannot take (already wrapped by a backend, ...)."""
        ...

    def prepare_training(
        self, runtime: Runtime, models: list[torch.nn.Module], optimizers: list[Any], schedulers: list[Any]
    ) -> tuple[list[Any], list[Any], list[Any]]: ...
    def backward(self, runtime: Runtime, loss: torch.Tensor, **kwargs: Any) -> None: ...
    def clip_grad_norm_(
        self, runtime: Runtime, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float
    ) -> torch.Tensor: ...
    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def replicated_tensors(self, runtime: Runtime) -> Iterable[tuple[str, torch.Tensor]]:
        """The tensors every rank holds identically (named), for the replica divergence check."""
        ...

    # -- checkpoints (every rank calls them) --------------------------------------------------------
    def save_training_state(self, runtime: Runtime, writer: CheckpointWriter) -> None:
        """Write every prepared model and optimizer through `writer` (checksummed, verified, snapshotted)."""
        ...

    def load_training_state(self, runtime: Runtime, reader: CheckpointReader) -> None: ...
    def full_state_dict(self, runtime: Runtime, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The unsharded, unwrapped state dict on rank 0 (None elsewhere is allowed)."""
        ...


@runtime_checkable
class GradientSyncControl(Protocol):
    """The strategy can skip gradient synchronisation (accumulation micro-steps, `no_sync`)."""

    def no_sync(
        self, runtime: Runtime, model: torch.nn.Module
    ) -> contextlib.AbstractContextManager[None]: ...
    def sync_now(self, runtime: Runtime, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """Synchronise the gradients of backward passes in the block even inside `no_sync` (for
        `trigger_sync_in_backward`, after forward passes that ran under `no_sync`)."""
        ...


@runtime_checkable
class DataLoaderWrapper(Protocol):
    """The strategy replaces each prepared dataloader by what the user iterates (XLA: a device loader)."""

    def wrap_dataloader(self, runtime: Runtime, loader: Any) -> Any: ...
