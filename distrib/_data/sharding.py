"""How a global stream of samples is cut into per-rank batches.

A *global batch* holds `batch_size * world_size` samples; rank `r` takes the slice `[r*b, (r+1)*b)`. Gathering
the ranks' batches in rank order therefore gives back the global batch in dataset order, which is what
`gather_for_metrics` relies on. With `even_batches`, the last incomplete global batch is completed by
wrapping around to the first samples, and `remainder` records how many of its samples are real.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import IterableDataset, RandomSampler, Sampler, SequentialSampler


def _pad_by_wrapping(items: list[Any], head: list[Any], size: int) -> list[Any]:
    """Fill `items` up to `size` by cycling through `head` (the first samples of the stream)."""
    source = head or items
    out = list(items)
    i = 0
    while len(out) < size:
        out.append(source[i % len(source)])
        i += 1
    return out


class GlobalBatchCutter:
    """Cuts a stream into global batches and returns this rank's slice of each."""

    def __init__(self, batch_size: int, rank: int, world_size: int, drop_last: bool, even_batches: bool):
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        # one process never pads: there is no other rank to keep in step with
        self.even_batches = even_batches and world_size > 1
        self.remainder: int | None = None  # real samples in the final global batch, once known
        self.last_real: list[Any] = []

    @property
    def global_size(self) -> int:
        return self.batch_size * self.world_size

    def cut(self, stream: Iterable[Any]) -> Iterator[list[Any]]:
        """This rank's slice of each global batch of `stream` (a list is cut by slicing, much faster)."""
        if isinstance(stream, list):
            return self._cut_list(stream)
        return self._cut_stream(stream)

    def _cut_list(self, items: list[Any]) -> Iterator[list[Any]]:
        self.remainder = None
        size, lo, hi = self.global_size, self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        full = len(items) - len(items) % size
        for start in range(0, full, size):
            yield items[start + lo : start + hi]
        if full < len(items):
            yield from self._finish(items[full:], items[:size])

    def _cut_stream(self, stream: Iterable[Any]) -> Iterator[list[Any]]:
        self.remainder = None
        size, lo, hi = self.global_size, self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        head: list[Any] = []
        chunk: list[Any] = []
        for item in stream:
            if len(head) < size:
                head.append(item)
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

    def num_batches(self, num_samples: int) -> int:
        full, rest = divmod(num_samples, self.global_size)
        if rest == 0 or self.drop_last:
            return full
        if self.even_batches:
            return full + 1
        return full + (1 if rest > self.rank * self.batch_size else 0)


def epoch_order(sampler: Sampler[Any]) -> Iterable[Any]:
    """The sampler's indices for one epoch; a list in one call for torch's own samplers (the hot path)."""
    if type(sampler) is SequentialSampler:
        return list(range(len(sampler)))
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        # the same draw RandomSampler.__iter__ makes from its generator, without a Python loop per index
        generator = sampler.generator
        if generator is None:
            generator = torch.Generator().manual_seed(
                int(torch.empty((), dtype=torch.int64).random_().item())
            )
        return torch.randperm(len(sampler.data_source), generator=generator).tolist()  # type: ignore[arg-type]
    return iter(sampler)


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's batches of indices, cut from the original sampler's index order.

    `skip` batches (set by `skip_first_batches` or a resumed checkpoint) are dropped at the index level
    for the next iteration only, so skipped samples are never loaded.
    """

    def __init__(self, sampler: Sampler[Any], cutter: GlobalBatchCutter) -> None:
        self.sampler = sampler
        self.cutter = cutter
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        batches = self.cutter.cut(epoch_order(self.sampler))
        yield from itertools.islice(batches, skip, None)

    def __len__(self) -> int:
        return self.cutter.num_batches(len(self.sampler))  # type: ignore[arg-type]

    @property
    def remainder(self) -> int | None:
        return self.cutter.remainder


class ShardedCustomBatchSampler(Sampler[list[int]]):
    """Shards a user's own batch sampler by whole batches: rank r takes batches r, r+W, r+2W, ...

    With `even_batches`, ranks that would come up one batch short repeat the first batches.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world_size: int, even_batches: bool):
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world_size = world_size
        self.even_batches = even_batches
        self.skip = 0
        self._cutter = GlobalBatchCutter(1, rank, world_size, False, even_batches)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batches in enumerate(self._cutter.cut(iter(self.batch_sampler))):
            if i >= skip:
                yield batches[0]

    @property
    def remainder(self) -> int | None:
        # the padding here is whole batches, but gather_for_metrics truncates by sample count
        if self._cutter.remainder is None:
            return None
        return sum(len(b) for b in self._cutter.last_real)

    def __len__(self) -> int:
        sized: Sized = self.batch_sampler  # type: ignore[assignment]
        return self._cutter.num_batches(len(sized))


class ShardedIterableDataset(IterableDataset[Any]):
    """This rank's samples of an iterable dataset: every rank reads the stream and keeps its slice."""

    def __init__(self, dataset: Iterable[Any], cutter: GlobalBatchCutter) -> None:
        self.dataset = dataset
        self.cutter = cutter

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                "a sharded iterable dataset cannot be split again across DataLoader workers; use "
                "num_workers<=1, or dispatch_batches=True so only rank 0 reads the stream."
            )
        for batch in self.cutter.cut(iter(self.dataset)):
            yield from batch

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def remainder(self) -> int | None:
        return self.cutter.remainder
