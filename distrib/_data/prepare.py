"""`prepare_dataloader`: turn the user's DataLoader into this rank's prepared one (sharded or dispatched)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from ..errors import PrepareError
from .dispatch import DispatchedDataLoader
from .loader import PreparedDataLoader, loader_arguments
from .sharding import (
    GlobalBatchCutter,
    ShardedBatchSampler,
    ShardedCustomBatchSampler,
    ShardedIterableDataset,
)

if TYPE_CHECKING:
    from .._runtime import Runtime


def prepare_dataloader(runtime: Runtime, loader: DataLoader, seed: int) -> DataLoader:  # type: ignore[type-arg]
    """Shard `loader` for this rank (or set up dispatch from rank 0)."""
    settings = runtime.settings
    is_iterable = isinstance(loader.dataset, IterableDataset)
    dispatch = settings.dispatch_batches if settings.dispatch_batches is not None else is_iterable
    if dispatch and runtime.world_size > 1:
        return DispatchedDataLoader.from_loader(runtime, loader, seed)
    batch_size = _per_rank_batch_size(runtime, loader)
    kwargs: dict[str, Any] = {"runtime": runtime, "seed": seed, "source": loader, **loader_arguments(loader)}
    if is_iterable:
        cutter = GlobalBatchCutter(
            batch_size or 1, runtime.dp_rank, runtime.dp_world_size, loader.drop_last, settings.even_batches
        )
        dataset = ShardedIterableDataset(loader.dataset, cutter)  # type: ignore[arg-type]
        return PreparedDataLoader(dataset, batch_size=batch_size, drop_last=loader.drop_last, **kwargs)
    batch_sampler = loader.batch_sampler
    if type(batch_sampler) is BatchSampler and batch_size is not None:
        cutter = GlobalBatchCutter(
            batch_size, runtime.dp_rank, runtime.dp_world_size, batch_sampler.drop_last, settings.even_batches
        )
        sharded: Any = ShardedBatchSampler(batch_sampler.sampler, cutter)  # type: ignore[arg-type]
    elif batch_sampler is not None:
        if settings.split_batches:
            raise PrepareError(
                "split_batches=True cannot split the batches of a custom batch_sampler; give the "
                "DataLoader a batch_size (and sampler) instead, or use split_batches=False."
            )
        sharded = ShardedCustomBatchSampler(
            batch_sampler, runtime.dp_rank, runtime.dp_world_size, settings.even_batches
        )
    else:
        raise PrepareError(
            "prepare() cannot shard a DataLoader built with batch_size=None (no automatic batching); "
            "give it a batch_size, or a batch_sampler that yields lists of indices."
        )
    return PreparedDataLoader(loader.dataset, batch_sampler=sharded, **kwargs)


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
