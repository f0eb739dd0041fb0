"""Dispatch from rank 0: only rank 0 reads the data; each global batch is broadcast and sliced per rank.

Use it (`dispatch_batches=True`, the default for iterable datasets) when a stream cannot be read by
every rank, or when reading it is expensive.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .._tree import leaves, replace_leaves, send_to_device, tree_map
from .loader import PreparedDataLoader, loader_arguments
from .sharding import _pad_by_wrapping

if TYPE_CHECKING:
    from .._runtime import Runtime


class _Slot:
    """Stands for a tensor in the structure that rank 0 sends ahead of the tensors."""


class DispatchedDataLoader(PreparedDataLoader):
    """Rank 0 loads global batches and broadcasts them; every rank keeps its slice."""

    per_rank: int = 1
    _remainder: int | None = None

    @classmethod
    def from_loader(cls, runtime: Runtime, loader: DataLoader, seed: int) -> DispatchedDataLoader:  # type: ignore[type-arg]
        per_rank = loader.batch_size or 1
        if runtime.settings.split_batches:
            global_size = per_rank
            per_rank = max(1, per_rank // runtime.dp_world_size)
        else:
            global_size = per_rank * runtime.dp_world_size
        common = loader_arguments(loader)
        sampler = None if isinstance(loader.dataset, torch.utils.data.IterableDataset) else loader.sampler
        new = cls(
            loader.dataset,
            batch_size=global_size,
            sampler=sampler,
            drop_last=loader.drop_last,
            runtime=runtime,
            seed=seed,
            source=loader,
            **common,
        )
        new.per_rank = per_rank
        new._remainder = None
        return new

    @property
    def remainder(self) -> int | None:
        return self._remainder

    def __len__(self) -> int:
        return DataLoader.__len__(self)

    def _batches(self, skip: int) -> Iterator[Any]:
        self._remainder = None
        source = self._rank0_stream(skip) if self.runtime.rank == 0 else None
        count = skip
        while True:
            received = self._receive(next(source) if source is not None else None)
            if received is None:
                return
            batch, is_last = received
            count += 1
            self.batches_yielded = count
            self.end_of_dataloader = is_last
            mine = self._slice(batch, is_last)
            if mine is not None:
                yield mine

    def _rank0_stream(self, skip: int) -> Iterator[tuple[Any, bool] | None]:
        iterator = DataLoader.__iter__(self)
        for _ in range(skip):
            next(iterator, None)
        batch = next(iterator, None)
        while batch is not None:
            upcoming = next(iterator, None)
            yield batch, upcoming is None
            batch = upcoming
        while True:
            yield None

    def _receive(self, payload: tuple[Any, bool] | None) -> tuple[Any, bool] | None:
        device = self.runtime.collective_device
        header: list[Any] = [None]
        if payload is not None:
            batch, is_last = payload
            tensors = leaves(batch)
            structure = tree_map(lambda _: _Slot(), batch)
            header[0] = (structure, [(t.shape, t.dtype) for t in tensors], is_last)
        dist.broadcast_object_list(header, src=0)
        if header[0] is None:
            return None
        structure, specs, is_last = header[0]
        tensors = tensors if payload is not None else [torch.empty(s, dtype=d) for s, d in specs]
        moved = [t.to(device).contiguous() for t in tensors]
        for t in moved:
            dist.broadcast(t, src=0)
        return replace_leaves(structure, moved, leaf=_Slot), is_last

    def _slice(self, batch: Any, is_last: bool) -> Any:
        # ranks of one tensor/context/pipeline group share a data-parallel rank, so they get the same slice
        rank, size = self.runtime.dp_rank, self.per_rank
        full = size * self.runtime.dp_world_size
        n = len(leaves(batch)[0]) if leaves(batch) else full
        if n < full and is_last:
            self._remainder = n

        def cut(t: torch.Tensor) -> torch.Tensor:
            if len(t) < full and self.runtime.settings.even_batches:
                order = _pad_by_wrapping(list(range(len(t))), [], full)
                t = t[order]
            return t[rank * size : (rank + 1) * size]

        sliced = tree_map(cut, batch)
        first = leaves(sliced)
        if first and len(first[0]) == 0:
            return None
        return send_to_device(sliced, self.runtime.device) if self._move else sliced
