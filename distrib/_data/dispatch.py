"""Dispatch from rank 0: only rank 0 reads the data; each global batch is broadcast and sliced per rank.

Use it (`dispatch_batches=True`, the default for iterable datasets) when a stream cannot be read by
every rank, or when reading it is expensive. Rank 0 draws the epoch's order by the same rules as the
sharded loaders and keeps the same global position, so checkpoints of both kinds resume alike. A failure
while rank 0 loads a batch is sent to every rank, so the others raise too instead of waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .. import errors
from .._preemption import at_step_boundary
from .._straggler import timed_batches
from .._tree import leaves, replace_leaves, send_to_device, tree_map
from ..errors import DataError, PrepareError
from .loader import PreparedDataLoader, loader_arguments
from .order import EpochOrder
from .sharding import GlobalBatchCutter, ShardedBatchSampler, ShardedIterableDataset, _pad_by_wrapping

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
            if per_rank % runtime.dp_world_size:
                raise PrepareError(
                    f"split_batches=True needs the DataLoader's batch_size ({per_rank}) to be a multiple of "
                    f"the number of data-parallel processes ({runtime.dp_world_size}); change the batch size "
                    "or use split_batches=False."
                )
            per_rank //= runtime.dp_world_size
        global_size = per_rank * runtime.dp_world_size
        # rank 0 cuts global batches: one "rank" of one, which never pads (padding happens in _slice)
        cutter = GlobalBatchCutter(global_size, 0, 1, loader.drop_last, False)
        common: dict[str, Any] = {
            "runtime": runtime,
            "seed": seed,
            "source": loader,
            "generator": loader.generator,
            **loader_arguments(loader),
        }
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):
            stream = ShardedIterableDataset(loader.dataset, cutter, allow_workers=True)
            new = cls(stream, batch_size=global_size, drop_last=loader.drop_last, shard=stream, **common)
        else:
            order = EpochOrder(loader.sampler, loader.generator, seed)
            sampler = ShardedBatchSampler(order, cutter)
            new = cls(loader.dataset, batch_sampler=sampler, shard=sampler, **common)
        new.per_rank = per_rank
        new._remainder = None
        return new

    # -- geometry: the shard cuts global batches; each rank keeps per_rank of each ----------------------
    def _per_rank(self) -> int:
        return self.per_rank

    def _set_per_rank(self, batch_size: int) -> None:
        self.per_rank = batch_size
        global_size = batch_size * self.runtime.dp_world_size
        self.shard.cutter.batch_size = global_size
        if isinstance(self.shard, ShardedIterableDataset):
            self.batch_sampler.batch_size = global_size  # type: ignore[union-attr]  # ours: DataLoader built it
            object.__setattr__(self, "batch_size", global_size)

    def _check_slice(self) -> tuple[int, int]:
        return 0, self.per_rank * self.runtime.dp_world_size  # rank 0 sees (and checks) whole global batches

    def _collective_check(self) -> bool:
        return False  # only rank 0 draws; a failure reaches the others with the next header

    @property
    def remainder(self) -> int | None:
        return self._remainder

    def __len__(self) -> int:
        return DataLoader.__len__(self)

    # -- iteration -----------------------------------------------------------------------------------------
    def _ragged(self) -> bool:
        # without even_batches the last global batch can leave some ranks with nothing
        return not self.runtime.settings.even_batches

    def _batches(self) -> Iterator[Any]:
        self._remainder = None
        source = self._rank0_stream() if self.runtime.rank == 0 else None
        count = self.start_batch
        state, watch = self.runtime.state, "preemption" in self.runtime.state.extensions
        while True:
            if watch and state.micro_step == 0:
                at_step_boundary(self.runtime, self)  # before the next global batch is read and sent
            received = self._receive(self._next_payload(source))
            if received is None:
                return
            batch, is_last = received
            count += 1
            self.batches_yielded = count
            self.end_of_dataloader = is_last
            mine = self._slice(batch, is_last)
            if mine is not None:
                yield mine

    def _next_payload(self, source: Iterator[tuple[Any, bool] | None] | None) -> Any:
        if source is None:
            return None
        try:
            return next(source)
        except Exception as e:
            return _Failure(e)

    def _rank0_stream(self) -> Iterator[tuple[Any, bool] | None]:
        iterator = timed_batches(self.runtime, DataLoader.__iter__(self))
        self.shard.start = 0  # the new iterator has taken it (DataLoader may call iter() on it twice)
        batch = next(iterator, None)
        while batch is not None:
            upcoming = next(iterator, None)
            yield batch, upcoming is None
            batch = upcoming
        while True:
            yield None

    def _receive(self, payload: Any) -> tuple[Any, bool] | None:
        device = self.runtime.collective_device
        header: list[Any] = [None]
        if isinstance(payload, _Failure):
            header[0] = ("failed", type(payload.error).__name__, str(payload.error))
        elif payload is not None:
            batch, is_last = payload
            tensors = leaves(batch)
            structure = tree_map(lambda _: _Slot(), batch)
            header[0] = (structure, [(t.shape, t.dtype) for t in tensors], is_last)
        dist.broadcast_object_list(header, src=0)
        if header[0] is None:
            return None
        if header[0][0] == "failed":
            _raise_failure(payload, header[0])
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


class _Failure:
    """What rank 0 hit while loading; sent to every rank in place of a batch."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _raise_failure(payload: Any, header: tuple[str, str, str]) -> None:
    if isinstance(payload, _Failure):
        raise payload.error  # rank 0: its own exception, with its traceback
    _, name, message = header
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.DistribError):
        raise cls(f"on rank 0, which loads the batches: {message}")
    raise DataError(f"rank 0 failed to load the next batch ({name}: {message}); see rank 0's traceback.")
