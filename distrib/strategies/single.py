"""One process, one device: place the model, run it under the precision plan, nothing to synchronise."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import SettingsError
from ._defaults import backward as backward
from ._defaults import check_model as check_model
from ._defaults import clip_grad_norm_ as clip_grad_norm_
from ._defaults import is_available as is_available
from ._defaults import place_model
from ._defaults import precision_plan as precision_plan
from ._defaults import replicated_tensors as replicated_tensors
from ._defaults import setup as setup
from ._defaults import teardown as teardown
from ._defaults import unavailable_reason as unavailable_reason
from ._defaults import unwrap_model as unwrap_model
from ._process_group import choose_device as choose_device
from ._process_group import collective_device as collective_device
from ._replicated_checkpoint import CHECKPOINT_WORLD_SIZE_DEPENDENT as CHECKPOINT_WORLD_SIZE_DEPENDENT
from ._replicated_checkpoint import full_state_dict as full_state_dict
from ._replicated_checkpoint import load_training_state as load_training_state
from ._replicated_checkpoint import save_training_state as save_training_state

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._runtime import Runtime
    from .._settings import Settings

NAME = "single"


def init_process_group(env: ProcessEnvironment, settings: Settings, device: torch.device) -> bool:
    if env.world_size > 1:
        raise SettingsError(
            f"strategy='single' runs one process, but this job has world_size={env.world_size}; "
            "use strategy='ddp' (or 'auto'), or launch a single process."
        )
    return False


def prepare_training(
    runtime: Runtime, models: list[torch.nn.Module], optimizers: list[Any], schedulers: list[Any]
) -> tuple[list[torch.nn.Module], list[Any], list[Any]]:
    return [place_model(runtime, m) for m in models], optimizers, schedulers
