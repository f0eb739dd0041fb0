"""`prepare()`: hand models, optimizers, dataloaders and schedulers to the run's strategy."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from . import _guards, _precision
from ._data.loader import PreparedDataLoader
from ._data.prepare import prepare_dataloader
from ._optim import PreparedOptimizer, PreparedScheduler
from ._runtime import Runtime, current
from .errors import PrepareError
from .strategies import DataLoaderWrapper

_SCHEDULER_TYPES: tuple[type, ...] = (torch.optim.lr_scheduler.LRScheduler,)
if hasattr(torch.optim.lr_scheduler, "ReduceLROnPlateau"):
    _SCHEDULER_TYPES += (torch.optim.lr_scheduler.ReduceLROnPlateau,)


def _kind(obj: Any) -> str:
    if isinstance(obj, (PreparedOptimizer, PreparedScheduler, PreparedDataLoader)):
        return "prepared"
    if isinstance(obj, torch.nn.Module):
        return "model"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, DataLoader):
        return "dataloader"
    if isinstance(obj, _SCHEDULER_TYPES):
        return "scheduler"
    _reject_misuse(obj)
    return "other"


def _reject_misuse(obj: Any) -> None:
    """Objects users pass by mistake get an error naming the right thing to pass."""
    if isinstance(obj, type):
        raise PrepareError(
            f"prepare() got the class {obj.__name__}, not an instance; create it first, e.g. "
            f"{obj.__name__}(...), then pass the object."
        )
    if isinstance(obj, Dataset):
        raise PrepareError(
            f"prepare() got a {type(obj).__name__} dataset; wrap it in a DataLoader first: "
            "prepare(DataLoader(dataset, batch_size=..., shuffle=...))."
        )
    if isinstance(obj, Sampler):
        raise PrepareError(
            "prepare() got a sampler; pass the DataLoader that uses it instead, and distrib shards it."
        )


def prepare(*objects: Any) -> Any:
    """Prepare training objects for the run; returns them in the same order.

    Models are moved to the device and wrapped by the strategy (DDP, FSDP, ...); optimizers and schedulers
    are adapted to gradient accumulation and fp16 loss scaling; dataloaders are sharded per rank and
    yield batches on the device. Other objects pass through untouched, and preparing a prepared object
    again returns it unchanged. One object in, one object out. Example::

        model, optimizer, train_loader, scheduler = prepare(model, optimizer, train_loader, scheduler)
    """
    runtime = current("prepare")
    if not objects:
        raise PrepareError("prepare() needs at least one object: prepare(model, optimizer, dataloader, ...).")
    kinds = [_kind(obj) for obj in objects]
    result = list(objects)
    # dataloaders first: a strategy may read their batch size when it builds the model (DeepSpeed "auto")
    loaders = [i for i, k in enumerate(kinds) if k == "dataloader"]
    seed = _shared_seed(runtime) if loaders else 0
    strategy = runtime.strategy_module
    for i in loaders:
        loader = prepare_dataloader(runtime, objects[i], seed)
        result[i] = (
            strategy.wrap_dataloader(runtime, loader) if isinstance(strategy, DataLoaderWrapper) else loader
        )
        runtime.state.dataloaders.append(result[i])
    _prepare_training_objects(runtime, objects, kinds, result)
    return result[0] if len(result) == 1 else tuple(result)


def _prepare_training_objects(
    runtime: Runtime, objects: tuple[Any, ...], kinds: list[str], result: list[Any]
) -> None:
    state = runtime.state
    idx = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ("model", "optimizer", "scheduler")}
    fresh_models = [i for i in idx["model"] if not any(objects[i] is m for m in state.models)]
    for i in idx["model"]:
        if i not in fresh_models:
            result[i] = objects[i]
    for i in fresh_models:
        runtime.strategy_module.check_model(objects[i])
    if not (fresh_models or idx["optimizer"] or idx["scheduler"]):
        return
    raw_models = [objects[i] for i in fresh_models]
    before = _guards.parameters_before(raw_models)
    models, optimizers, schedulers = runtime.strategy_module.prepare_training(
        runtime, raw_models, [objects[i] for i in idx["optimizer"]], [objects[i] for i in idx["scheduler"]]
    )
    _guards.record_replaced(runtime, before, models)
    _guards.watch_unprepared_optimizers(runtime)
    for i, model in zip(fresh_models, models):
        result[i] = model
        state.models.append(model)
    for i, optimizer in zip(idx["optimizer"], optimizers):
        result[i] = (
            optimizer if isinstance(optimizer, PreparedOptimizer) else PreparedOptimizer(optimizer, runtime)
        )
        state.optimizers.append(result[i])
    for i, scheduler in zip(idx["scheduler"], schedulers):
        result[i] = (
            scheduler if isinstance(scheduler, PreparedScheduler) else PreparedScheduler(scheduler, runtime)
        )
        state.schedulers.append(result[i])


def _shared_seed(runtime: Runtime) -> int:
    """One shuffling seed for every rank: the settings' seed, else a draw broadcast from rank 0."""
    if runtime.settings.seed is not None:
        return runtime.settings.seed
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    if runtime.world_size > 1:
        seed = seed.to(runtime.collective_device)
        dist.broadcast(seed, src=0)
    return int(seed.item())


def unwrap_model(model: torch.nn.Module, keep_autocast: bool = True) -> torch.nn.Module:
    """The user's own module inside whatever the strategy wrapped it in (DDP, FSDP, compile, ...).

    With `keep_autocast=False` the mixed-precision forward added by `prepare` is removed too. Example::

        state = unwrap_model(model).state_dict()
    """
    runtime = current("unwrap_model")
    inner = runtime.strategy_module.unwrap_model(model)
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if not keep_autocast:
        _precision.unwrap_forward(inner)
    return inner
