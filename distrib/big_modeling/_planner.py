"""One greedy pass of the device-map planner: walk the model in order and fill devices one after another.

`infer_auto_device_map` (in ``_device_map``) runs this pass several times with different limits (room
kept for streamed layers, balanced per-GPU budgets) and keeps the best plan that obeys the rules.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..errors import DeviceMapError
from ._memory import Device, format_size
from ._placement import DeviceMap, is_under, lookup

Item = tuple[str, "nn.Module | None"]  # a module, or a tensor (None) by its full name


@dataclass
class Slot:
    """One device in filling order: its hard limit and, for balanced plans, a running target."""

    device: Device
    capacity: int | None  # bytes; None: unlimited
    target: float | None = None  # balanced filling: total placed when this device is done
    used: int = 0


@dataclass
class NoSplit:
    """Which modules the planner keeps whole."""

    names: frozenset[str] = frozenset()
    classes: tuple[type, ...] = ()

    @classmethod
    def of(cls, given: Iterable[str | type] | None, what: str = "no_split_module_classes") -> NoSplit:
        if isinstance(given, (str, type)):
            given = [given]
        items = list(given or ())
        for item in items:
            if not isinstance(item, (str, type)):
                raise DeviceMapError(
                    f"{what} holds {item!r}; give class names such as 'GPT2Block' or classes"
                )
        names = frozenset(c for c in items if isinstance(c, str))
        return cls(names, tuple(c for c in items if isinstance(c, type)))

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.names or isinstance(module, self.classes)


def splittable(model: nn.Module, module: nn.Module | None, no_split: NoSplit) -> bool:
    """A module the planner may divide into its children: not a leaf, not listed (the model always is)."""
    if module is None or not module._modules:
        return False  # a leaf runs as one piece, so its tensors stay together
    return module is model or not no_split.matches(module)


def children(name: str, module: nn.Module) -> list[Item]:
    """A module's own tensors, then its child modules, as planner items in model order."""
    prefix = f"{name}." if name else ""
    tensors = [
        attr for attr, value in (*module._parameters.items(), *module._buffers.items()) if value is not None
    ]
    items: list[Item] = [(prefix + attr, None) for attr in tensors]
    items += [(prefix + child, sub) for child, sub in module._modules.items() if sub is not None]
    return items


def layers(model: nn.Module, no_split: NoSplit, root: str = "", module: nn.Module | None = None) -> list[str]:
    """The pieces the planner never divides under ``root``: kept-whole modules, leaves and loose tensors."""
    found: list[str] = []
    stack: list[Item] = [(root, model if module is None else module)]
    while stack:
        name, current = stack.pop()
        if current is not None and splittable(model, current, no_split):
            stack.extend(reversed(children(name, current)))
        else:
            found.append(name)
    return found


@dataclass
class Planner:
    """Fill ``slots`` in order with the model's modules, splitting only what does not fit."""

    model: nn.Module
    sizes: dict[str, int]
    no_split: NoSplit
    tied: list[list[str]]
    slots: list[Slot]
    fallback: bool = False
    device_map: DeviceMap = field(default_factory=dict)
    early: dict[str, int] = field(default_factory=dict)  # tied partners placed ahead of model order
    placed_total: int = 0
    index: int = 0

    def placed(self, name: str) -> bool:
        return lookup(self.device_map, name) is not None

    def partners(self, name: str) -> list[str]:
        """What must move with ``name``: holders of its tied parameters that lie outside it."""
        found: list[str] = []
        for group in self.tied:
            if not any(is_under(member, name) for member in group):
                continue
            for member in group:
                owner = member.rpartition(".")[0]
                # a leaf module goes whole; a container keeps its children free and lends the tensor only
                holder = member if self.model.get_submodule(owner)._modules else owner
                if not is_under(member, name) and not self.placed(holder) and holder not in found:
                    found.append(holder)
        return found

    def size(self, name: str) -> int:
        inner = sum(size for key, size in self.early.items() if key != name and is_under(key, name))
        return self.sizes.get(name, 0) - inner

    def group_size(self, name: str) -> tuple[list[str], int]:
        group = [name, *self.partners(name)]
        return group, sum(self.size(member) for member in group)

    def fits(self, size: int, atomic: bool) -> bool:
        slot = self.slots[self.index]
        if slot.capacity is not None and slot.used + size > slot.capacity:
            return False
        share = size / 2 if atomic else size
        return slot.target is None or self.placed_total + share <= slot.target

    def place(self, names: list[str], size: int) -> None:
        slot = self.slots[self.index]
        for name in names:
            self.device_map[name] = slot.device
        for partner in names[1:]:
            self.early[partner] = self.size(partner)
        slot.used += size
        self.placed_total += size

    def run(self) -> DeviceMap:
        """The raw plan (may name a module and a tied tensor inside it; flatten it before use)."""
        queue: deque[Item] = deque([("", self.model)])
        if not self.slots:
            raise NotEnoughMemory(self.placed_total)
        while queue:
            name, module = queue.popleft()
            if self.placed(name):
                continue
            group, size = self.group_size(name)
            can_split = splittable(self.model, module, self.no_split)
            if self.fits(size, atomic=not can_split):
                self.place(group, size)
            elif can_split:
                assert module is not None
                queue.extendleft(reversed(children(name, module)))
            else:
                if not (self.fallback and self.fill_empty_slot(queue)):
                    self.next_device()
                queue.appendleft((name, module))  # try it again, on this device or the next
        return self.device_map

    def fill_empty_slot(self, queue: deque[Item]) -> bool:
        """fallback_allocation: a device about to be left empty takes the first later piece that fits.

        Searches the rest of the model breadth first (splitting what may be split) and places one piece
        out of model order; returns False when nothing fits, and the device is then skipped.
        """
        slot = self.slots[self.index]
        if slot.used or slot.device == "disk":
            return False
        search: deque[Item] = deque(queue)
        while search:
            name, module = search.popleft()
            if self.placed(name):
                continue
            group, size = self.group_size(name)
            if self.fits(size, atomic=True):
                self.place(group, size)
                return True
            if splittable(self.model, module, self.no_split):
                assert module is not None
                search.extend(children(name, module))
        return False

    def next_device(self) -> None:
        self.index += 1
        if self.index >= len(self.slots):
            raise NotEnoughMemory(self.placed_total)


class NotEnoughMemory(Exception):
    """Internal: the slots ran out; `_device_map` turns it into a `DeviceMapError` with the budget."""

    def __init__(self, placed: int) -> None:
        super().__init__(placed)
        self.placed = placed


def not_enough_memory(total: int, placed: int, budget: str) -> DeviceMapError:
    return DeviceMapError(
        f"the model needs {format_size(total)} but max_memory ({budget}) holds only {format_size(placed)} "
        "of it (in whole layers, keeping room where offloaded layers are streamed through): at least "
        f"{format_size(total - placed)} more is needed. Raise max_memory, or allow 'disk' "
        "(offload_folder=... in load_checkpoint_and_dispatch, or a larger max_memory['disk'])"
    )
