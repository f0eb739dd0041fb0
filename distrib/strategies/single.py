"""One process, one device: place the model, add autocast, nothing to synchronise."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import SettingsError
from . import _common
from ._common import backward, choose_device, clip_grad_norm_, collective_device, teardown
from ._replicated_checkpoint import (
    CHECKPOINT_WORLD_SIZE_DEPENDENT,
    full_state_dict,
    load_training_state,
    save_training_state,
)

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._runtime import Runtime
    from .._settings import Settings

NAME = "single"
__all__ = [
    "CHECKPOINT_WORLD_SIZE_DEPENDENT",
    "NAME",
    "backward",
    "choose_device",
    "clip_grad_norm_",
    "collective_device",
    "full_state_dict",
    "init_process_group",
    "is_available",
    "load_training_state",
    "prepare_training",
    "save_training_state",
    "setup",
    "teardown",
    "unavailable_reason",
    "unwrap_model",
]


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def init_process_group(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    if env.world_size > 1:
        raise SettingsError(
            f"strategy='single' runs one process, but this job has world_size={env.world_size}; "
            "use strategy='ddp' (or 'auto'), or launch a single process."
        )
    return False


def setup(runtime: Runtime) -> None:
    return None


def prepare_training(
    runtime: Runtime, models: list[torch.nn.Module], optimizers: list[Any], schedulers: list[Any]
) -> tuple[list[torch.nn.Module], list[Any], list[Any]]:
    return [_common.place_model(runtime, m) for m in models], optimizers, schedulers


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return model
