"""Streaming offloaded layers: what each layer loads, and a prefetcher that loads the next one early.

An offloaded *layer* (a `Unit`) is the set of offloaded tensors one module loads right before it runs
and drops right after: a module of ``preload_module_classes`` or of the model's no-split classes (for
transformers, its decoder layers) loads every offloaded tensor below it; any other module loads only
the offloaded tensors it holds itself. Each tensor comes from a `Source`: a tensor kept in RAM (CPU
offload with a GPU main device) or an offload-folder entry, read as a zero-copy memory map of a ``.dat``
file or of the checkpoint's own safetensors shard.

The `Streamer` of a dispatched model remembers which layer ran after which (the first pass follows
model order) and, when a layer starts, maps the predicted next layer and asks the kernel to read its
pages ahead (``MADV_WILLNEED``: asynchronous, so the disk reads overlap the current layer's compute).
No thread: one that ran Python beside the model would compete with it for the GIL, which measured
slower than reading nothing ahead. At most two layers are mapped at once, the running one and the next;
the next one's pages join the process's memory only as it runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ._mapped import read_ahead_pages
from ._offload import OffloadFolder
from ._placement import TensorSlot


class Source(Protocol):
    """Where an offloaded tensor's data lives between forwards."""

    def restore(self) -> torch.Tensor:
        """An independent copy in RAM (for `remove_hooks`)."""
        ...


@dataclass(frozen=True)
class RamSource:
    tensor: torch.Tensor

    def restore(self) -> torch.Tensor:
        return self.tensor


@dataclass(frozen=True)
class FolderSource:
    folder: OffloadFolder
    name: str

    def restore(self) -> torch.Tensor:
        return self.folder.load(self.name).clone()  # a copy in RAM, independent of the file


@dataclass(frozen=True)
class Offloaded:
    slot: TensorSlot
    placeholder: torch.Tensor  # the meta tensor the module holds between forwards (shared by tied slots)
    source: Source


@dataclass
class Unit:
    """The offloaded tensors one module loads before it runs."""

    name: str
    items: list[Offloaded] = field(default_factory=list)

    @property
    def reads_files(self) -> bool:
        return any(isinstance(item.source, FolderSource) for item in self.items)

    def fetch(self, *, read_ahead: bool) -> list[torch.Tensor]:
        """The items' data on the host: RAM tensors as they are, folder tensors as fresh memory maps."""
        host: list[torch.Tensor | None] = [None] * len(self.items)
        by_folder: dict[int, tuple[OffloadFolder, list[int]]] = {}
        for position, item in enumerate(self.items):
            source = item.source
            if isinstance(source, FolderSource):
                by_folder.setdefault(id(source.folder), (source.folder, []))[1].append(position)
            else:
                assert isinstance(source, RamSource)
                host[position] = source.tensor
        for folder, positions in by_folder.values():
            names = [self.items[p].source.name for p in positions]  # type: ignore[attr-defined]
            tensors = folder.load_many(names)
            if read_ahead:
                read_ahead_pages(tensors)
            for position, tensor in zip(positions, tensors):
                host[position] = tensor
        return host  # type: ignore[return-value]

    def install(self, host: list[torch.Tensor], device: torch.device) -> None:
        loaded: dict[int, torch.Tensor] = {}  # tied slots of this layer share one tensor
        for item, value in zip(self.items, host):
            key = id(item.placeholder)
            if key not in loaded:
                value = value.to(device)
                if item.slot.is_param:
                    value = nn.Parameter(value, requires_grad=item.placeholder.requires_grad)
                loaded[key] = value
            item.slot.put(loaded[key])

    def release(self) -> None:
        for item in self.items:
            item.slot.put(item.placeholder)


class Streamer:
    """Loads layers for one dispatched model and reads ahead the one expected next."""

    def __init__(self, device: torch.device, units: list[Unit]) -> None:
        self.device = device
        self.in_order = {id(unit): following for unit, following in itertools.pairwise(units)}
        self.successor: dict[int, Unit] = {}
        self.last: Unit | None = None
        self.pending: tuple[Unit, list[torch.Tensor]] | None = None
        self.prefetch = any(unit.reads_files for unit in units)
        self.hits = 0  # layers whose weights were mapped and read ahead (for tests and diagnostics)

    def enter(self, unit: Unit) -> None:
        if self.last is not None and self.last is not unit:
            self.successor[id(self.last)] = unit  # learn the order the model really runs in
        self.last = unit
        host = self._take(unit)
        unit.install(host if host is not None else unit.fetch(read_ahead=False), self.device)
        following = self.successor.get(id(unit)) or self.in_order.get(id(unit))
        if self.prefetch and following is not None and following is not unit and following.reads_files:
            try:
                self.pending = (following, following.fetch(read_ahead=True))
            except Exception:
                self.pending = None

    def leave(self, unit: Unit) -> None:
        unit.release()

    def _take(self, unit: Unit) -> list[torch.Tensor] | None:
        pending, self.pending = self.pending, None
        if pending is None or pending[0] is not unit:
            return None  # a wrong guess: its maps are dropped
        self.hits += 1
        return pending[1]

    def close(self) -> None:
        self.pending = None
