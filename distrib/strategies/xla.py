"""Data parallel on XLA devices (TPUs; also GPUs or CPU through PJRT) with torch_xla. Needs `distrib[xla]`.

One process per XLA device, as PJRT runs it (`PJRT_DEVICE=TPU distrib launch ...`, `torchrun`, or
`torch_xla.launch`). The process group uses torch_xla's "xla" backend (`init_method="xla://"`), so
distrib's collectives (gather, reduce, broadcast, ...) run over it. Gradients are all-reduced when the
optimizer steps (`xm.optimizer_step`), so accumulation micro-steps never communicate; the lazy graph is
cut after every optimizer step (`XLAOptions.sync_every_step`) and by the prepared dataloader, a
`MpDeviceLoader` that uploads batches in the background. Checkpoints: replicas are identical, so rank 0
writes one copy (`xm.save`).

torch_xla is imported only when a run uses this strategy.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._optim import PreparedOptimizer
from ..errors import CheckpointMismatchError, SettingsError, missing_extra
from . import _defaults
from ._defaults import backward as backward
from ._defaults import check_model as check_model
from ._defaults import precision_plan as precision_plan
from ._defaults import replicated_tensors as replicated_tensors
from ._defaults import teardown as teardown
from ._defaults import unwrap_model as unwrap_model
from ._xla_loader import XLADeviceLoader

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._runtime import Runtime
    from .._settings import Settings
    from ..checkpointing._reader import CheckpointReader
    from ..checkpointing._writer import CheckpointWriter

NAME = "xla"
CHECKPOINT_WORLD_SIZE_DEPENDENT = False

_PURPOSE = "strategy='xla'"
_STATE_FILE = "xla_training_state.pt"


@dataclass(eq=False)
class XLAState:
    """The strategy's own state: whether this step's gradients were already all-reduced (by clipping)."""

    gradients_reduced: bool = False


def collective_device(device: torch.device) -> torch.device:
    """torch_xla's process group takes tensors on the XLA device."""
    return device


def is_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def unavailable_reason() -> str:
    return (
        f"{missing_extra('torch_xla', 'xla', _PURPOSE)} (torch_xla must match torch's version exactly, "
        "e.g. torch_xla 2.9 with torch 2.9)"
    )


def _xm() -> Any:
    try:
        import torch_xla.core.xla_model as xm
    except ImportError as exc:
        raise missing_extra("torch_xla", "xla", _PURPOSE) from exc
    return xm


def choose_device(env: ProcessEnvironment, settings: Settings) -> torch.device:
    """This process's XLA device (`torch_xla.device()`, or `xm.xla_device()` on older releases)."""
    import torch_xla

    device_fn = getattr(torch_xla, "device", None)
    return torch.device(device_fn() if callable(device_fn) else _xm().xla_device())


def init_process_group(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    """Join torch_xla's process group (backend "xla", ranks from the PJRT runtime)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    import torch_xla.distributed.xla_backend  # noqa: F401 - registers the "xla" backend

    dist.init_process_group("xla", init_method="xla://")
    return True


def setup(runtime: Runtime) -> XLAState:
    """Check that distrib and PJRT agree on the ranks (a launch that set no RANK would not)."""
    import torch_xla.runtime as xr

    if xr.world_size() != runtime.world_size or xr.global_ordinal() != runtime.rank:
        raise SettingsError(
            f"PJRT runs this process as rank {xr.global_ordinal()} of {xr.world_size()}, but the launch "
            f"environment says rank {runtime.rank} of {runtime.world_size}. The launcher must export "
            "RANK, WORLD_SIZE and LOCAL_RANK to each XLA process: use torchrun (or `distrib launch`) "
            "with PJRT_DEVICE set, or export them from torch_xla.runtime before opening the scope."
        )
    return XLAState()


def _state(runtime: Runtime) -> XLAState:
    state = runtime.state.strategy_state
    assert isinstance(state, XLAState), "the XLA strategy's state is set up by distributed()"
    return state


class XLAOptimizer(PreparedOptimizer):
    """`step()` all-reduces the gradients over the replicas, steps, and cuts the lazy graph. Example::

    model, optimizer = prepare(model, optimizer)      # strategy="xla"
    optimizer.step()                                  # xm.optimizer_step(...); torch_xla.sync()
    """

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        if self._checks_pending:
            self._first_steps()
        if not self._training.sync_gradients:
            return None
        xm = _xm()
        state = _state(self._runtime)
        if self._scaler is None and not state.gradients_reduced:
            result = xm.optimizer_step(self.optimizer, optimizer_args={"closure": closure} if closure else {})
            self._training.optimizer_step_skipped = False
            self._count_step()
        else:
            if not state.gradients_reduced:
                xm.reduce_gradients(self.optimizer)
            result = super().step(closure)
        state.gradients_reduced = False
        if self._runtime.settings.xla.sync_every_step:
            _sync()
        return result


def _sync() -> None:
    import torch_xla

    sync = getattr(torch_xla, "sync", None)
    if callable(sync):
        sync()
    else:
        _xm().mark_step()


def prepare_training(
    runtime: Runtime, models: list[nn.Module], optimizers: list[Any], schedulers: list[Any]
) -> tuple[list[nn.Module], list[Any], list[Any]]:
    """Place models on the XLA device; optimizers all-reduce gradients when they step."""
    models = [_defaults.place_model(runtime, m) for m in models]
    return models, [XLAOptimizer(o, runtime) for o in optimizers], schedulers


def wrap_dataloader(runtime: Runtime, loader: Any) -> XLADeviceLoader:
    """Upload batches to the device in the background (`MpDeviceLoader`)."""
    return XLADeviceLoader(loader, runtime)


def clip_grad_norm_(
    runtime: Runtime, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float
) -> torch.Tensor:
    """All-reduce the gradients first (clipping needs the replicas' mean), then clip."""
    state = _state(runtime)
    if not state.gradients_reduced:
        xm = _xm()
        for optimizer in runtime.state.optimizers:
            xm.reduce_gradients(getattr(optimizer, "optimizer", optimizer))
        state.gradients_reduced = True
    return _defaults.clip_grad_norm_(runtime, parameters, max_norm, norm_type)


def save_training_state(runtime: Runtime, writer: CheckpointWriter) -> None:
    """Replicas are identical: rank 0 writes one copy of the models' and optimizers' state (on the CPU)."""
    if runtime.rank != 0:
        return
    state = {
        "models": [m.state_dict() for m in runtime.state.models],
        "optimizers": [o.state_dict() for o in runtime.state.optimizers],
    }
    writer.torch_object(_STATE_FILE, _to_cpu(state))


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return type(value)((k, _to_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def load_training_state(runtime: Runtime, reader: CheckpointReader) -> None:
    """Load every model and optimizer; the checkpoint must hold exactly as many of each as this run."""
    state = reader.torch_object(_STATE_FILE, "cpu")
    models, optimizers = state.get("models", []), state.get("optimizers", [])
    for kind, saved, prepared in (
        ("model", models, runtime.state.models),
        ("optimizer", optimizers, runtime.state.optimizers),
    ):
        if len(saved) != len(prepared):
            raise CheckpointMismatchError(
                f"{str(reader.directory / _STATE_FILE)!r} holds {len(saved)} {kind}(s), but this run prepared "
                f"{len(prepared)}; prepare() the same {kind}s, in the same order, as the run that saved it."
            )
    for model, saved in zip(runtime.state.models, models):
        model.load_state_dict(saved)
    for optimizer, saved in zip(runtime.state.optimizers, optimizers):
        optimizer.load_state_dict(saved)


def full_state_dict(runtime: Runtime, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state dict moved to the CPU, on rank 0."""
    if runtime.rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
