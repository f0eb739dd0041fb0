"""`prepare_dataloader`: turn the user's DataLoader into this rank's prepared one (sharded or dispatched).

The user's DataLoader, sampler, batch sampler and generator are never changed: distrib builds its own
loader around them (see `order.py` for how each epoch's order is drawn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from ..errors import PrepareError
from .dispatch import DispatchedDataLoader
from .loader import PreparedDataLoader, loader_arguments
from .order import EpochOrder, OrderAgreement, all_values
from .sharding import (
    GlobalBatchCutter,
    ShardedBatchSampler,
    ShardedCustomBatchSampler,
    ShardedIterableDataset,
)

if TYPE_CHECKING:
    from .._runtime import Runtime

#: torch's samplers that yield one index at a time (a DataLoader with batch_size=None cannot be sharded
#: by their items: each would be one sample without a batch dimension)
_PER_SAMPLE = (SequentialSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def prepare_dataloader(runtime: Runtime, loader: DataLoader, seed: int) -> DataLoader:  # type: ignore[type-arg]
    """Shard `loader` for this rank (or set up dispatch from rank 0)."""
    _refuse_distributed_sampler(loader)
    settings = runtime.settings
    is_iterable = isinstance(loader.dataset, IterableDataset)
    dispatch = settings.dispatch_batches if settings.dispatch_batches is not None else is_iterable
    if dispatch and runtime.dp_world_size > 1:
        prepared: PreparedDataLoader = DispatchedDataLoader.from_loader(runtime, loader, seed)
    elif is_iterable:
        prepared = _iterable(runtime, loader, seed)
    else:
        prepared = _map_style(runtime, loader, seed)
    order = prepared.shard.epoch_order
    if order is not None and runtime.world_size > 1 and not isinstance(prepared, DispatchedDataLoader):
        if order.user_generators:
            _check_generators_agree(runtime, order)
        if not order.controlled:
            prepared.shard.order_check = OrderAgreement(runtime)
    return prepared


def _common(runtime: Runtime, loader: DataLoader, seed: int) -> dict[str, Any]:  # type: ignore[type-arg]
    return {"runtime": runtime, "seed": seed, "source": loader, **loader_arguments(loader)}


def _iterable(runtime: Runtime, loader: DataLoader, seed: int) -> PreparedDataLoader:  # type: ignore[type-arg]
    batch_size = _per_rank_batch_size(runtime, loader)
    cutter = GlobalBatchCutter(
        batch_size or 1,
        runtime.dp_rank,
        runtime.dp_world_size,
        loader.drop_last,
        runtime.settings.even_batches,
    )
    dataset = ShardedIterableDataset(loader.dataset, cutter)  # type: ignore[arg-type]
    return PreparedDataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=loader.drop_last,
        generator=loader.generator,
        shard=dataset,
        **_common(runtime, loader, seed),
    )


def _map_style(runtime: Runtime, loader: DataLoader, seed: int) -> PreparedDataLoader:  # type: ignore[type-arg]
    settings = runtime.settings
    batch_sampler = loader.batch_sampler
    common = _common(runtime, loader, seed)
    if type(batch_sampler) is BatchSampler and loader.batch_size is not None:
        batch_size = _per_rank_batch_size(runtime, loader)
        assert batch_size is not None
        cutter = GlobalBatchCutter(
            batch_size, runtime.dp_rank, runtime.dp_world_size, batch_sampler.drop_last, settings.even_batches
        )
        shard = ShardedBatchSampler(EpochOrder(loader.sampler, loader.generator, seed), cutter)
        return PreparedDataLoader(
            loader.dataset, batch_sampler=shard, generator=loader.generator, shard=shard, **common
        )
    if settings.split_batches:
        raise PrepareError(
            "split_batches=True cannot split the batches of a custom batch_sampler (or of a sampler that "
            "yields batches); give the DataLoader a batch_size (and sampler) instead, or use "
            "split_batches=False."
        )
    if batch_sampler is not None:
        custom = ShardedCustomBatchSampler(
            EpochOrder(batch_sampler, loader.generator, seed),
            runtime.dp_rank,
            runtime.dp_world_size,
            settings.even_batches,
        )
        return PreparedDataLoader(
            loader.dataset, batch_sampler=custom, generator=loader.generator, shard=custom, **common
        )
    return _unbatched(runtime, loader, seed, common)


def _unbatched(runtime: Runtime, loader: DataLoader, seed: int, common: dict[str, Any]) -> PreparedDataLoader:  # type: ignore[type-arg]
    """batch_size=None: every item the sampler yields is one batch (e.g. `sampler=BatchSampler(...)`)."""
    sampler = loader.sampler
    if isinstance(sampler, _PER_SAMPLE) and not isinstance(sampler, BatchSampler):
        raise PrepareError(
            "prepare() cannot shard a DataLoader built with batch_size=None whose sampler yields single "
            f"indices ({type(sampler).__name__}); give it a batch_size, or a sampler that yields lists "
            "of indices, e.g. DataLoader(dataset, sampler=BatchSampler(RandomSampler(dataset), 32, "
            "drop_last=False), batch_size=None)."
        )
    settings = runtime.settings
    shard = ShardedCustomBatchSampler(
        EpochOrder(sampler, loader.generator, seed),
        runtime.dp_rank,
        runtime.dp_world_size,
        settings.even_batches,
    )
    return PreparedDataLoader(
        loader.dataset, sampler=shard, batch_size=None, generator=loader.generator, shard=shard, **common
    )


def _refuse_distributed_sampler(loader: DataLoader) -> None:  # type: ignore[type-arg]
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
            raise PrepareError(
                f"prepare() got a DataLoader whose sampler is a DistributedSampler over "
                f"{sampler.num_replicas} replicas: distrib shards the DataLoader itself, so every rank "
                "would see only a fraction of its shard. Build the DataLoader with shuffle=True (or your "
                "own sampler) instead; distrib reshuffles every epoch without set_epoch()."
            )


def _check_generators_agree(runtime: Runtime, order: EpochOrder) -> None:
    states = all_values(runtime, order.generators_digest())
    if len(set(states)) > 1:
        groups: dict[int, list[int]] = {}
        for rank, state in enumerate(states):
            groups.setdefault(state, []).append(rank)
        listing = "; ".join(f"ranks {ranks}" for ranks in groups.values())
        raise PrepareError(
            "prepare(): the DataLoader's generator (or its sampler's) is in different states on different "
            f"ranks ({listing} agree among themselves), so they would shuffle differently and see "
            "overlapping data. Seed it the same way on every rank, e.g. "
            "generator=torch.Generator().manual_seed(42), or leave generator=None and use the seed setting."
        )


def _per_rank_batch_size(runtime: Runtime, loader: DataLoader) -> int | None:  # type: ignore[type-arg]
    batch_size = loader.batch_size
    if batch_size is None or not runtime.settings.split_batches:
        return batch_size
    if batch_size % runtime.dp_world_size:
        raise PrepareError(
            f"split_batches=True needs the DataLoader's batch_size ({batch_size}) to be a multiple of the "
            f"number of data-parallel processes ({runtime.dp_world_size}); change the batch size or use "
            "split_batches=False."
        )
    return batch_size // runtime.dp_world_size
