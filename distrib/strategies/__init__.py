"""Strategy modules: one per backend, each with the same small set of functions.

Every strategy module defines:

* `NAME` and `is_available() -> bool` (and `unavailable_reason() -> str` saying how to get it);
* `choose_device(env, settings) -> torch.device` and
  `init_process_group(env, settings, device) -> bool` (True when it created the group);
* `setup(runtime) -> state` and `teardown(runtime)`;
* `prepare_training(runtime, models, optimizers, schedulers) -> (models, optimizers, schedulers)`;
* `backward(runtime, loss, **kwargs)`, `clip_grad_norm_(runtime, parameters, max_norm, norm_type)`,
  `unwrap_model(model)`;
* checkpoints: `save_training_state(runtime, writer)` / `load_training_state(runtime, reader)` (every
  prepared model and optimizer, through `checkpointing._writer.CheckpointWriter` and
  `checkpointing._reader.CheckpointReader`, which checksum, verify and snapshot; all ranks call them),
  `full_state_dict(runtime, model)` (the
  unsharded, unwrapped state dict on rank 0, None elsewhere allowed) and the constant
  `CHECKPOINT_WORLD_SIZE_DEPENDENT` (True where a checkpoint cannot be loaded at another world size).

Optional abilities are small protocols a module opts into by defining the function:

* `no_sync(runtime, model)`: a context manager that skips gradient synchronisation
  (`GradientSyncControl`); strategies without it always synchronise.
* `wrap_dataloader(runtime, loader) -> loader`: called by `prepare` on each prepared dataloader (before the
  models of the same call are prepared); returns what the user iterates (XLA: a background device loader).

Only this package may branch on the backend; the free functions call these functions.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import SettingsError

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._settings import Settings

#: name -> module path; modules are imported on first use so unused backends cost nothing.
REGISTRY: dict[str, str] = {
    "single": "distrib.strategies.single",
    "ddp": "distrib.strategies.ddp",
    "fsdp": "distrib.strategies.fsdp",
    "deepspeed": "distrib.strategies.deepspeed",
    "xla": "distrib.strategies.xla",
}

REQUIRED_FUNCTIONS = (
    "is_available",
    "unavailable_reason",
    "choose_device",
    "init_process_group",
    "collective_device",
    "setup",
    "teardown",
    "prepare_training",
    "backward",
    "clip_grad_norm_",
    "unwrap_model",
    "save_training_state",
    "load_training_state",
    "full_state_dict",
)


def load(name: str) -> ModuleType:
    """Import the strategy module registered under `name`."""
    if name not in REGISTRY:
        raise SettingsError(f"unknown strategy {name!r}; choose one of: {', '.join(REGISTRY)}.")
    return importlib.import_module(REGISTRY[name])


def resolve(settings: Settings, env: ProcessEnvironment) -> ModuleType:
    """The strategy module for these settings; "auto" means single on one process, DDP on several."""
    name = settings.strategy
    if name == "auto":
        name = "ddp" if env.world_size > 1 else "single"
    module = load(name)
    if not module.is_available():
        raise SettingsError(f"strategy {name!r} cannot run here: {module.unavailable_reason()}")
    return module


def supports_no_sync(module: ModuleType) -> bool:
    """Whether the strategy can skip gradient synchronisation on accumulation micro-steps."""
    return callable(getattr(module, "no_sync", None))
