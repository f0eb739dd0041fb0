"""Strategy modules: one per backend, each behind the same typed contract.

`_contract.Strategy` lists what every strategy module defines; mypy checks every registered module against
it (below), and `_defaults.py` holds the implementations most of them share. Optional abilities are
protocols a module opts into by defining the function (`GradientSyncControl.no_sync`,
`DataLoaderWrapper.wrap_dataloader`). Only this package may branch on the backend; the free functions call
the contract. How to add a strategy: `docs/concepts/contributing.md`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

from ..errors import SettingsError
from ._contract import DataLoaderWrapper, GradientSyncControl, Strategy

if TYPE_CHECKING:
    from .._environment import ProcessEnvironment
    from .._settings import Settings
    from . import ddp, deepspeed, fsdp, single, xla

    # mypy checks each module against the contract, and the opt-in abilities of those that claim them
    _CONTRACT: tuple[Strategy, ...] = (single, ddp, fsdp, deepspeed, xla)
    _SYNC_CONTROL: tuple[GradientSyncControl, ...] = (ddp, fsdp, deepspeed)
    _LOADER_WRAPPERS: tuple[DataLoaderWrapper, ...] = (xla,)

__all__ = ["REGISTRY", "DataLoaderWrapper", "GradientSyncControl", "Strategy", "load", "resolve"]

#: name -> module path; modules are imported on first use so unused backends cost nothing.
REGISTRY: dict[str, str] = {
    "single": "distrib.strategies.single",
    "ddp": "distrib.strategies.ddp",
    "fsdp": "distrib.strategies.fsdp",
    "deepspeed": "distrib.strategies.deepspeed",
    "xla": "distrib.strategies.xla",
}


def load(name: str) -> Strategy:
    """Import the strategy module registered under `name`."""
    if name not in REGISTRY:
        raise SettingsError(f"unknown strategy {name!r}; choose one of: {', '.join(REGISTRY)}.")
    return cast(Strategy, importlib.import_module(REGISTRY[name]))


def resolve(settings: Settings, env: ProcessEnvironment) -> Strategy:
    """The strategy module for these settings; "auto" means single on one process, DDP on several."""
    name = settings.strategy
    if name == "auto":
        name = "ddp" if env.world_size > 1 else "single"
    module = load(name)
    if not module.is_available():
        raise SettingsError(f"strategy {name!r} cannot run here: {module.unavailable_reason()}")
    return module
