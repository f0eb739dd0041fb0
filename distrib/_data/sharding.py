"""How the epoch's global order is cut into per-rank batches, from any position.

A *global batch* holds `batch_size * world_size` units (samples, or a batch sampler's batches); rank `r`
takes the slice `[r*b, (r+1)*b)`. Gathering the ranks' batches in rank order therefore gives back the
global batch in dataset order, which is what `gather_for_metrics` relies on. With `even_batches`, the last
incomplete global batch is completed by wrapping around to the first units of the epoch, and `remainder`
records how many of its units are real.

Every cut can start at any unit of the order (`start`): that is how a resumed run, on any number of
processes, deals out the rest of the epoch it was in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import IterableDataset, Sampler

from ..errors import DataError, PrepareError
from .order import EpochOrder


def _pad_by_wrapping(items: list[Any], head: list[Any], size: int) -> list[Any]:
    """Fill `items` up to `size` by cycling through `head` (the first units of the epoch)."""
    source = head or items
    out = list(items)
    i = 0
    while len(out) < size:
        out.append(source[i % len(source)])
        i += 1
    return out


class GlobalBatchCutter:
    """Cuts an order into global batches and returns this rank's slice of each."""

    def __init__(self, batch_size: int, rank: int, world_size: int, drop_last: bool, even_batches: bool):
        self.batch_size = batch_size  # changed by a resume on another number of processes
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        # one process never pads: there is no other rank to keep in step with
        self.even_batches = even_batches and world_size > 1
        self.remainder: int | None = None  # real units in the final global batch, once known
        self.last_real: list[Any] = []

    @property
    def global_size(self) -> int:
        return self.batch_size * self.world_size

    def cut(self, stream: Iterable[Any], start: int = 0) -> Iterator[list[Any]]:
        """This rank's slice of each global batch of `stream` after its first `start` units (a list is cut
        by slicing, much faster)."""
        if isinstance(stream, list):
            return self._cut_list(stream, start)
        return self._cut_stream(stream, start)

    def _cut_list(self, items: list[Any], start: int) -> Iterator[list[Any]]:
        self.remainder = None
        size, lo, hi = self.global_size, self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        end = start + (len(items) - start) // size * size if start < len(items) else start
        for first in range(start, end, size):
            yield items[first + lo : first + hi]
        if end < len(items):
            yield from self._finish(items[end:], items[:size])

    def _cut_stream(self, stream: Iterable[Any], start: int) -> Iterator[list[Any]]:
        self.remainder = None
        size, lo, hi = self.global_size, self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        head: list[Any] = []
        chunk: list[Any] = []
        for position, item in enumerate(stream):
            if len(head) < size:
                head.append(item)
            if position < start:
                continue  # consumed before the resume: read (a stream cannot seek), not dealt
            chunk.append(item)
            if len(chunk) == size:
                yield chunk[lo:hi]
                chunk = []
        if chunk:
            yield from self._finish(chunk, head)

    def _finish(self, chunk: list[Any], head: list[Any]) -> Iterator[list[Any]]:
        """The last, incomplete global batch: dropped, padded by wrapping around, or cut short."""
        if self.drop_last:
            return
        self.remainder = len(chunk)
        self.last_real = list(chunk)
        if self.even_batches:
            chunk = _pad_by_wrapping(chunk, head, self.global_size)
        mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        if mine:
            yield mine

    def num_batches(self, num_units: int, start: int = 0, rank: int | None = None) -> int:
        """This rank's (or `rank`'s) batches when the order has `num_units` units and the cut starts at
        `start`."""
        full, rest = divmod(max(0, num_units - start), self.global_size)
        if rest == 0 or self.drop_last:
            return full
        if self.even_batches:
            return full + 1
        return full + (1 if rest > (self.rank if rank is None else rank) * self.batch_size else 0)

    def same_count_everywhere(self) -> bool:
        """Whether every rank yields the same number of batches, whatever the order's length."""
        return self.even_batches or self.drop_last or self.world_size == 1

    def position(self, start: int, batches: int, num_units: int | None) -> tuple[int, int]:
        """(units consumed, padding units dealt) after `batches` global batches from `start`."""
        consumed = start + batches * self.global_size
        if num_units is None or consumed <= num_units:
            return consumed, 0
        return num_units, (consumed - num_units if self.even_batches else 0)

    def global_batch(self, items: list[Any], start: int) -> list[Any]:
        """The global batch that starts at unit `start`, padded as the cut pads it ([]: there is none)."""
        size = self.global_size
        real = items[start : start + size]
        if not real or (len(real) < size and self.drop_last):
            return []
        return _pad_by_wrapping(real, items[:size], size) if self.even_batches else real


#: called once at the start of an iteration with the first unit this rank will yield (None: none)
FirstCheck = Callable[[Any], None]


class _Shard:
    """What the prepared loader needs from each way of sharding: the cut, the pending start, the order."""

    cutter: GlobalBatchCutter
    epoch_order: EpochOrder | None = None
    order: list[Any] | None = None  # the current epoch's global order, once drawn
    unit = "samples"

    def __init__(self) -> None:
        self.start = 0  # units to pass over in the next iteration (a resume or skip_first_batches)
        self.first_check: FirstCheck | None = None
        self.order_check: Callable[[list[Any]], None] | None = None  # ranks compare each epoch's order

    def _draw(self) -> list[Any]:
        assert self.epoch_order is not None
        order = self.order = self.epoch_order.draw()
        if self.order_check is not None:
            self.order_check(order)
        return order

    def num_units(self) -> int | None:
        return None

    def _checked(self, batches: Iterator[Any]) -> Iterator[Any]:
        """`batches`, after running the pending first-batch check on the first of them (only after a
        resume: otherwise `batches` itself, with no extra generator on the way)."""
        check, self.first_check = self.first_check, None
        return batches if check is None else self._first_checked(batches, check)

    @staticmethod
    def _first_checked(batches: Iterator[Any], check: FirstCheck) -> Iterator[Any]:
        first = next(batches, None)
        check(first)
        if first is not None:
            yield first
            yield from batches


class ShardedBatchSampler(_Shard, Sampler[list[int]]):
    """This rank's batches of indices, cut from the epoch's order.

    Units passed over at the start of an iteration (a resume, `skip_first_batches`) are dropped at the
    index level, so they are never loaded.
    """

    def __init__(self, epoch_order: EpochOrder, cutter: GlobalBatchCutter) -> None:
        super().__init__()
        self.epoch_order = epoch_order
        self.sampler = epoch_order.source  # the user's sampler, read-only
        self.cutter = cutter

    def __iter__(self) -> Iterator[list[int]]:
        # the start is taken when DataLoader calls iter() (its iterator may call it twice; the prepared
        # loader clears it once the iterator exists); the order is drawn at the first batch, as torch's
        # samplers draw theirs (after the loader's iterator has drawn its base seed)
        return self._batches(self.start)

    def _batches(self, start: int) -> Iterator[list[int]]:
        order = self._draw()
        yield from self._checked(self.cutter.cut(order, start))
        self.epoch_order.finish()  # type: ignore[union-attr]

    def __len__(self) -> int:
        return self.cutter.num_batches(len(self.sampler))  # type: ignore[arg-type]

    def num_units(self) -> int | None:
        return len(self.sampler)  # type: ignore[arg-type]

    @property
    def remainder(self) -> int | None:
        return self.cutter.remainder


class ShardedCustomBatchSampler(_Shard, Sampler[Any]):
    """Shards a batch sampler by whole batches: rank r takes batches r, r+W, r+2W, ...

    With `even_batches`, ranks that would come up one batch short repeat the epoch's first batches.
    """

    unit = "batches"

    def __init__(self, epoch_order: EpochOrder, rank: int, world_size: int, even_batches: bool) -> None:
        super().__init__()
        self.epoch_order = epoch_order
        self.batch_sampler = epoch_order.source  # the user's batch sampler, read-only
        self.cutter = GlobalBatchCutter(1, rank, world_size, False, even_batches)

    def __iter__(self) -> Iterator[Any]:
        return self._batches(self.start)  # taken when DataLoader calls iter(), like ShardedBatchSampler

    def _batches(self, start: int) -> Iterator[Any]:
        order = self._draw()
        if order and not isinstance(order[0], (list, tuple)) and not torch.is_tensor(order[0]):
            raise PrepareError(
                f"prepare() deals a DataLoader with batch_size=None out by the items its sampler yields, "
                f"which must be lists of indices (a BatchSampler); this sampler yielded {order[0]!r}. Give "
                "the DataLoader a batch_size instead, or a sampler that yields batches of indices."
            )
        yield from self._checked(batches[0] for batches in self.cutter.cut(order, start))
        self.epoch_order.finish()  # type: ignore[union-attr]

    @property
    def remainder(self) -> int | None:
        # the padding here is whole batches, but gather_for_metrics truncates by sample count
        if self.cutter.remainder is None:
            return None
        return sum(len(b) for b in self.cutter.last_real)

    def __len__(self) -> int:
        sized: Sized = self.batch_sampler  # type: ignore[assignment]
        return self.cutter.num_batches(len(sized))

    def num_units(self) -> int | None:
        return len(self.batch_sampler)  # type: ignore[arg-type]


class ShardedIterableDataset(_Shard, IterableDataset[Any]):
    """This rank's samples of an iterable dataset: every rank reads the stream and keeps its slice."""

    def __init__(
        self, dataset: Iterable[Any], cutter: GlobalBatchCutter, allow_workers: bool = False
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.cutter = cutter
        self.allow_workers = allow_workers  # rank 0 of a dispatched loader: the dataset splits its stream

    def __iter__(self) -> Iterator[Any]:
        # not a generator function: DataLoader calls iter() when its iterator is created, and the start
        # must be taken then (in the worker too, from its copy of this object)
        start, self.start = self.start, 0
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1 and not (self.allow_workers and start == 0):
            raise DataError(
                "an iterable dataset read by every rank cannot be split again across DataLoader workers, "
                "nor resumed mid-epoch when each worker reads part of the stream; use num_workers<=1 (or "
                "dispatch_batches=True, so only rank 0 reads the stream)."
            )
        return self._samples(start)

    def _samples(self, start: int) -> Iterator[Any]:
        for batch in self.cutter.cut(iter(self.dataset), start):
            yield from batch

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def remainder(self) -> int | None:
        return self.cutter.remainder
