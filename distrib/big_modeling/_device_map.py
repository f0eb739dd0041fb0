"""`infer_auto_device_map`: a pure planner that spreads a model over GPUs, then the CPU, then disk."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from ..errors import DeviceMapError
from ._memory import Device, compute_module_sizes, format_size, get_max_memory
from ._placement import DeviceMap, is_under, lookup, tied_parameter_names

Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
NoSplit = Iterable[str | type]


@dataclass
class _Slot:
    device: Device
    capacity: int | None  # hard limit in bytes; None: unlimited
    target: float | None = None  # balanced strategies: total placed when this device is done
    used: int = 0


@dataclass
class _Planner:
    model: nn.Module
    sizes: dict[str, int]
    no_split: tuple[Iterable[str], tuple[type, ...]]
    tied: list[list[str]]
    slots: list[_Slot]
    device_map: DeviceMap = field(default_factory=dict)
    split: list[str] = field(default_factory=list)
    early: dict[str, int] = field(default_factory=dict)  # tied partners placed ahead of model order
    placed_total: int = 0
    index: int = 0
    budget: str = ""  # max_memory as the user gave it, for error messages

    def splittable(self, module: nn.Module | None) -> bool:
        if module is None or not module._modules:
            return False  # a leaf runs as one piece, so its tensors stay together
        names, classes = self.no_split
        no_split = type(module).__name__ in names or isinstance(module, classes)
        return module is self.model or not no_split  # the model itself always splits

    def children(self, name: str, module: nn.Module) -> list[tuple[str, nn.Module | None]]:
        prefix = f"{name}." if name else ""
        tensors = [*module._parameters, *module._buffers]
        items: list[tuple[str, nn.Module | None]] = [(prefix + attr, None) for attr in tensors]
        items += [(prefix + child, sub) for child, sub in module._modules.items() if sub is not None]
        return items

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
        queue: deque[tuple[str, nn.Module | None]] = deque([("", self.model)])
        if not self.slots:
            raise _not_enough_memory(self)
        while queue:
            name, module = queue.popleft()
            if self.placed(name):
                continue
            group = [name, *self.partners(name)]
            size = sum(self.size(member) for member in group)
            splittable = self.splittable(module)
            if self.fits(size, atomic=not splittable):
                self.place(group, size)
            elif splittable:
                assert module is not None
                queue.extendleft(reversed(self.children(name, module)))
                self.split.append(name)
            else:
                self.next_device()
                queue.appendleft((name, module))
        return _merge(self.device_map, self.split, self.model)

    def next_device(self) -> None:
        self.index += 1
        if self.index >= len(self.slots):
            raise _not_enough_memory(self)


def _not_enough_memory(planner: _Planner) -> DeviceMapError:
    total = planner.sizes[""]
    budget = planner.budget or ", ".join(
        f"{s.device!r}: {format_size(s.capacity or 0)}" for s in planner.slots
    )
    missing = total - planner.placed_total
    return DeviceMapError(
        f"the model needs {format_size(total)} but max_memory ({budget}) holds only "
        f"{format_size(planner.placed_total)} of it (in whole layers, keeping room on the main device for "
        f"the largest one): at least {format_size(missing)} more is needed. Raise max_memory, or allow "
        "'disk' (offload_folder=... in load_checkpoint_and_dispatch, or a larger max_memory['disk'])"
    )


def _merge(device_map: DeviceMap, split: list[str], model: nn.Module) -> DeviceMap:
    """Fold the entries of a split module back into one when they all landed on the same device."""
    for name in reversed(split):
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        parts = [prefix + attr for attr in (*module._parameters, *module._buffers, *module._modules)]
        devices = {device_map.get(part, None) for part in parts}
        if len(devices) == 1 and None not in devices:
            for part in parts:
                del device_map[part]
            device_map[name] = devices.pop()  # type: ignore[assignment]
    order = {name: i for i, name in enumerate(_module_and_tensor_order(model))}
    return dict(sorted(device_map.items(), key=lambda item: order.get(item[0], -1)))


def _module_and_tensor_order(model: nn.Module) -> list[str]:
    names = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        names.append(module_name)
        prefix = f"{module_name}." if module_name else ""
        names += [prefix + attr for attr in (*module._parameters, *module._buffers)]
    return names


def _max_layer_size(model: nn.Module, sizes: Mapping[str, int], planner: _Planner) -> int:
    """Size of the largest piece the planner will never split (a no-split block, a leaf or a tensor)."""
    largest = 0
    stack: list[tuple[str, nn.Module | None]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if module is not None and planner.splittable(module):
            stack.extend(planner.children(name, module))
        else:
            largest = max(largest, sizes.get(name, 0))
    return largest


def _slots(memory: dict[Device, int], strategy: str, total: int, reserve: int) -> list[_Slot]:
    """Devices in filling order with their limits; with ``reserve``, the main device keeps that room."""
    gpus = [d for d in memory if isinstance(d, int)]
    if strategy == "balanced_low_0" and len(gpus) > 1:
        gpus = [*gpus[1:], gpus[0]]
    order: list[Device] = [*gpus, *(d for d in memory if not isinstance(d, int))]
    if "disk" not in memory:
        order.append("disk")
    slots = [_Slot(d, memory.get(d)) for d in order]
    if reserve:
        main = min(gpus) if gpus else "cpu"
        for slot in slots:
            if slot.device == main and slot.capacity is not None:
                slot.capacity = max(0, slot.capacity - reserve)
    else:
        spread = {"auto": gpus if len(gpus) > 1 else [], "balanced": gpus, "balanced_low_0": gpus[:-1]}
        targets = spread.get(strategy, [])
        for i, slot in enumerate(slots[: max(0, len(targets) - 1)]):
            slot.target = math.ceil(total * (i + 1) / len(targets))
    return [slot for slot in slots if slot.capacity != 0]


def _offloads(device_map: DeviceMap, memory: dict[Device, int]) -> bool:
    """True when some layers will be streamed to the main device (from RAM or from disk)."""
    streamed = ("cpu", "disk") if any(isinstance(d, int) for d in memory) else ("disk",)
    return any(device in streamed for device in device_map.values())


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[object, int | str] | None = None,
    no_split_module_classes: NoSplit | None = None,
    dtype: torch.dtype | str | None = None,
    strategy: Strategy = "auto",
) -> DeviceMap:
    """Plan where each part of ``model`` goes: GPUs first, then "cpu", then "disk".

    Pure: reads only module sizes and ``max_memory`` (measured with `get_max_memory` when None), so it
    works on a model built with `init_empty_weights` and with fake GPUs in ``max_memory``. Modules are
    kept in model order and split into children only when they do not fit; classes in
    ``no_split_module_classes`` (names or types, e.g. ``["LlamaDecoderLayer"]``) are never split, and
    tied parameters stay on one device. When the model does not fit on the GPUs (or, without GPUs, in
    RAM), the main device keeps room for the largest layer, which offloaded layers are streamed into.
    "disk" is unlimited unless ``max_memory`` names it.

    ``strategy``: "sequential" fills GPU 0, then GPU 1, ...; "balanced" spreads the model evenly over
    the GPUs; "balanced_low_0" does the same but fills GPU 0 last, leaving it room for generation;
    "auto" is "balanced" with several GPUs, else "sequential". Example::

        with init_empty_weights():
            model = MyModel()
        infer_auto_device_map(model, {0: "2GiB", 1: "2GiB", "cpu": "8GiB"}, ["Block"])
        # {'embed': 0, 'blocks.0': 0, ..., 'blocks.9': 1, 'blocks.10': 'cpu', 'head': 'cpu'}
    """
    if strategy not in STRATEGIES:
        raise DeviceMapError(f"strategy={strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}")
    memory = get_max_memory(max_memory)
    sizes = compute_module_sizes(model, dtype)
    names = [c for c in no_split_module_classes or () if isinstance(c, str)]
    classes = tuple(c for c in no_split_module_classes or () if isinstance(c, type))
    tied = tied_parameter_names(model)

    def plan(reserve: int) -> DeviceMap:
        slots = _slots(memory, strategy, sizes[""], reserve)
        budget = ", ".join(f"{device!r}: {format_size(size)}" for device, size in memory.items())
        return _Planner(model, sizes, (names, classes), tied, slots, budget=budget).run()

    device_map = plan(reserve=0)
    if _offloads(device_map, memory):
        # Offloaded layers are brought to the main device one at a time: plan again keeping room there
        # for the largest one (and without balancing: the GPUs are full anyway).
        layer = _max_layer_size(model, sizes, _Planner(model, sizes, (names, classes), tied, []))
        device_map = plan(reserve=layer)
    return device_map
