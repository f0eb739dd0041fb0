"""`PreparedDataLoader`: a DataLoader that yields this rank's batches on the run's device.

It reseeds shuffling identically on every rank at each epoch (no `set_epoch` call needed), tracks its
position (epoch, batches yielded) so a run can resume mid-epoch without re-reading skipped samples, and
flags the last batch of an epoch so `accumulate` synchronises there and `gather_for_metrics` drops the
padding that `even_batches` added.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from .._runtime import current
from .._straggler import timed_batches
from .._tree import send_to_device
from ..errors import PrepareError
from .sharding import (
    ShardedBatchSampler,
    ShardedCustomBatchSampler,
    ShardedIterableDataset,
)

if TYPE_CHECKING:
    from .._runtime import Runtime

#: DataLoader arguments a prepared loader copies from the user's loader
_LOADER_ARGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "persistent_workers",
    "pin_memory_device",
)


def loader_arguments(loader: DataLoader) -> dict[str, Any]:  # type: ignore[type-arg]
    """The worker, collation and pinning arguments of `loader`, to build its prepared replacement with."""
    common = {name: getattr(loader, name) for name in _LOADER_ARGS}
    if loader.num_workers > 0:
        common["prefetch_factor"] = loader.prefetch_factor
    return common


class PreparedDataLoader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader sharded for this rank. Created by `prepare(loader)`; not built directly."""

    def __init__(self, *args: Any, runtime: Runtime, seed: int, source: DataLoader, **kwargs: Any):  # type: ignore[type-arg]
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        self.seed = seed
        self.source = source
        self.epoch = 0
        self.batches_yielded = 0
        self.end_of_dataloader = False
        self._next_epoch = 0
        self._skip = 0
        self._replay = 0
        self._move = runtime.settings.device_placement
        self._device = runtime.device

    # -- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Where iteration stands: `{"epoch", "batches_yielded", "seed"}` (for checkpoints)."""
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration continues epoch `epoch` after `batches_yielded` batches."""
        self.seed = int(state["seed"])
        epoch, done = int(state["epoch"]), int(state["batches_yielded"])
        if self._has_len() and done >= len(self):
            epoch, done = epoch + 1, 0
        self._next_epoch, self._skip = epoch, done
        self.epoch, self.batches_yielded = epoch, done

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (optional: epochs advance by themselves)."""
        self._next_epoch = epoch

    def skip_next(self, num_batches: int) -> None:
        self._skip = num_batches

    @property
    def remainder(self) -> int | None:
        """Real samples (over all ranks) in the final global batch of this epoch, if it was padded."""
        for owner in (self.batch_sampler, self.dataset):
            if isinstance(owner, (ShardedBatchSampler, ShardedCustomBatchSampler, ShardedIterableDataset)):
                return owner.remainder
        return None

    def _has_len(self) -> bool:
        try:
            len(self)
        except TypeError:
            return False
        return True

    # -- iteration ------------------------------------------------------------------------------
    def _begin_epoch(self) -> int:
        epoch = self.epoch = self._next_epoch
        self._next_epoch += 1
        # torch draws each iterator's base seed from this generator: seeded per epoch, starting an epoch
        # leaves the global random state alone, so a run resumed mid-epoch draws exactly what it would have
        self.generator = torch.Generator().manual_seed(self.seed + epoch)
        sampler = getattr(self.batch_sampler, "sampler", None) or getattr(
            self.batch_sampler, "batch_sampler", None
        )
        for obj in (sampler, getattr(sampler, "sampler", None), self.dataset):
            if obj is not None and hasattr(obj, "generator"):
                obj.generator = torch.Generator().manual_seed(self.seed + epoch)
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        skip = self._skip
        self._skip = 0
        self._replay = 0
        if skip and isinstance(self.batch_sampler, (ShardedBatchSampler, ShardedCustomBatchSampler)):
            self.batch_sampler.skip = skip  # skipped at the index level: nothing is loaded
        elif skip:
            self._replay = skip  # an iterable stream can only be skipped by reading it
        return skip

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip = self._begin_epoch()
        state = self.runtime.state
        previous, state.active_dataloader = state.active_dataloader, self
        self.end_of_dataloader = False
        try:
            yield from self._batches(skip)
        finally:
            self.end_of_dataloader = True
            if state.active_dataloader is self:
                state.active_dataloader = previous

    def _batches(self, skip: int) -> Iterator[Any]:
        total = len(self) if self._has_len() else None
        count = skip
        iterator = timed_batches(self.runtime, super().__iter__())  # timed only for the straggler report
        for _ in range(self._replay):
            next(iterator, None)
        if total is None:
            yield from self._batches_with_lookahead(iterator, count)
            return
        # object.__setattr__ skips DataLoader's Python-level __setattr__ check on every batch
        set_attribute = object.__setattr__
        move, device = self._move and self._device.type != "cpu", self._device
        for batch in iterator:
            count += 1
            set_attribute(self, "batches_yielded", count)
            set_attribute(self, "end_of_dataloader", count >= total)
            yield send_to_device(batch, device, non_blocking=True) if move else batch

    def _batches_with_lookahead(self, iterator: Iterator[Any], count: int) -> Iterator[Any]:
        # without a length, the last batch is known only when the next fetch fails
        try:
            batch = next(iterator)
        except StopIteration:
            return
        for upcoming in iterator:
            count += 1
            self.batches_yielded = count
            yield send_to_device(batch, self._device, non_blocking=True) if self._move else batch
            batch = upcoming
        self.batches_yielded = count + 1
        self.end_of_dataloader = True
        yield send_to_device(batch, self._device, non_blocking=True) if self._move else batch

    def __len__(self) -> int:
        return len(self.batch_sampler) if self.batch_sampler is not None else super().__len__()  # type: ignore[arg-type]

    def remaining_in_epoch(self) -> int | None:
        """Batches left in this epoch, counting the one just yielded; None for iterable datasets."""
        if not self._has_len():
            return None
        return len(self) - self.batches_yielded + 1


def skip_first_batches(loader: DataLoader, num_batches: int) -> DataLoader:  # type: ignore[type-arg]
    """Make the next iteration of a prepared loader start after `num_batches` batches (not loaded).

    Returns the same loader, so it reads like Accelerate's helper. Example::

        for batch in skip_first_batches(train_loader, 120):
            ...
    """
    current("skip_first_batches")
    if not isinstance(loader, PreparedDataLoader):
        raise PrepareError("skip_first_batches() needs a DataLoader returned by prepare(); prepare it first.")
    if num_batches < 0:
        raise PrepareError(f"skip_first_batches(num_batches={num_batches}) needs a number >= 0.")
    loader.skip_next(num_batches)
    return loader
