"""`infer_auto_device_map` and `get_balanced_memory`: pure planners over module sizes and memory budgets.

The rules, in the order they apply:

1. Devices are filled in order: GPUs (by index), other accelerators, "cpu", then "disk". Modules keep
   model order and are split into their children only when they do not fit; modules of the
   ``no_split_module_classes``, leaves and single tensors are never split. Tied parameters go together.
2. *Streamed layers.* A layer offloaded to "cpu" (when a GPU runs the model) or to "disk" is brought to
   the main device (the first GPU, else the CPU) while it runs, so the main device keeps room for the
   largest layer that is actually offloaded, and nothing more: layers that stay resident are never
   streamed, so they never count against that room. With disk offload and a GPU main device, the CPU
   also keeps room for the largest disk layer (its pages pass through RAM). Without
   ``offload_buffers``, the buffers of offloaded layers stay on the main device and count there too.
   The planner finds the smallest such room by planning again until the room it kept covers what the
   plan streams (a fixed point reached from below, so the first module is never pushed off a device
   that could hold it).
3. "balanced" plans cap each GPU's budget (see `get_balanced_memory`) and then fill in order.
4. ``fallback_allocation=True``: a device that the in-order rule would leave empty takes the first
   later piece that fits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ..errors import DeviceMapError, DistribWarning
from ._memory import Device, compute_module_sizes, format_size, get_max_memory, to_dtype
from ._placement import DeviceMap, flatten_device_map, tied_parameter_names
from ._planner import NoSplit, NotEnoughMemory, Planner, Slot, layers, not_enough_memory

Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
NoSplitClasses = Iterable[str | type]

_STREAMED = ("cpu", "disk")


@dataclass(frozen=True)
class _Model:
    """What the planner reads about a model, computed once."""

    model: nn.Module
    sizes: dict[str, int]  # tied tensors counted once: what the model holds
    full_sizes: dict[str, int]  # tied tensors counted under every name: what a streamed layer loads
    buffer_sizes: dict[str, int]
    no_split: NoSplit
    tied: list[list[str]]

    @classmethod
    def of(cls, model: nn.Module, no_split: NoSplitClasses | None, dtype: torch.dtype | str | None) -> _Model:
        dtype = to_dtype(dtype)
        return cls(
            model,
            compute_module_sizes(model, dtype),
            _tensor_sizes(model, dtype, buffers=True, params=True),
            _tensor_sizes(model, dtype, buffers=True, params=False),
            NoSplit.of(no_split),
            tied_parameter_names(model),
        )

    def largest_layer(self, entry: str) -> int:
        """Bytes of the largest piece under ``entry`` that runs as one streamed layer."""
        try:
            module = self.model.get_submodule(entry)
        except AttributeError:
            return self.full_sizes.get(entry, 0)  # a tensor entry
        pieces = layers(self.model, self.no_split, entry, module)
        return max((self.full_sizes.get(piece, 0) for piece in pieces), default=0)


def _tensor_sizes(
    model: nn.Module, dtype: torch.dtype | None, *, buffers: bool, params: bool
) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        tensors = [
            *(module._parameters.items() if params else ()),
            *(module._buffers.items() if buffers else ()),
        ]
        for attr, tensor in tensors:
            if tensor is None:
                continue
            itemsize = (
                dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
            )
            parts = (prefix + attr).split(".")
            for depth in range(len(parts) + 1):
                key = ".".join(parts[:depth])
                sizes[key] = sizes.get(key, 0) + tensor.numel() * itemsize
    return sizes


def _budget_text(memory: Mapping[Device, int]) -> str:
    return ", ".join(f"{device!r}: {format_size(size)}" for device, size in memory.items())


def _plan(
    info: _Model, memory: Mapping[Device, int], reserves: Mapping[Device, int], fallback: bool
) -> DeviceMap:
    """One in-order fill of ``memory`` less ``reserves``; raises `NotEnoughMemory` when it cannot hold the model."""
    order = list(memory) + ([] if "disk" in memory else ["disk"])
    slots = []
    for device in order:
        capacity = memory.get(device)
        if capacity is not None:
            capacity = max(0, capacity - reserves.get(device, 0))
        if capacity != 0:
            slots.append(Slot(device, capacity))
    raw = Planner(info.model, info.sizes, info.no_split, info.tied, slots, fallback=fallback).run()
    return flatten_device_map(info.model, raw)


def _required_reserves(
    info: _Model, device_map: DeviceMap, memory: Mapping[Device, int], offload_buffers: bool
) -> dict[Device, int]:
    """The room each device must keep for the layers ``device_map`` streams through it."""
    used = set(device_map.values())
    main = next((device for device in memory if device not in _STREAMED and device in used), "cpu")
    streamed = ("disk",) if main == "cpu" else _STREAMED
    offloaded = [name for name, device in device_map.items() if device in streamed]
    need: dict[Device, int] = {}
    if offloaded:
        need[main] = max(info.largest_layer(name) for name in offloaded)
        if not offload_buffers:
            need[main] += sum(info.buffer_sizes.get(name, 0) for name in offloaded)
    on_disk = [name for name, device in device_map.items() if device == "disk"]
    if main != "cpu" and on_disk and "cpu" in memory:
        need["cpu"] = max(info.largest_layer(name) for name in on_disk)
    return need


def _plan_with_reserves(
    info: _Model, memory: Mapping[Device, int], *, fallback: bool, offload_buffers: bool, warn: bool = True
) -> DeviceMap:
    """Plan, then plan again keeping the room the plan's streamed layers need, until that room suffices.

    The room only grows, starting from none, so the result keeps as much resident as the rules allow.
    """
    reserves: dict[Device, int] = {}
    while True:
        try:
            device_map = _plan(info, memory, reserves, fallback)
        except NotEnoughMemory as error:
            raise not_enough_memory(info.sizes[""], error.placed, _budget_text(memory)) from None
        need = _required_reserves(info, device_map, memory, offload_buffers)
        if all(size <= reserves.get(device, 0) for device, size in need.items()):
            if warn:
                _warn_if_over_budget(need, memory)
            return device_map
        for device, size in need.items():
            reserves[device] = max(reserves.get(device, 0), size)


def _warn_if_over_budget(need: Mapping[Device, int], memory: Mapping[Device, int]) -> None:
    over = {device: size for device, size in need.items() if device in memory and size > memory[device]}
    if over:
        details = ", ".join(
            f"{device!r} needs {format_size(size)} for its largest streamed layer but max_memory gives it "
            f"{format_size(memory[device])}"
            for device, size in over.items()
        )
        warnings.warn(
            f"the plan streams layers larger than their device's budget ({details}); running the model will "
            "use that much anyway. Raise max_memory, or split those layers (no_split_module_classes)",
            DistribWarning,
            stacklevel=4,
        )


def _gpus(memory: Mapping[Device, int]) -> list[Device]:
    return [device for device in memory if device not in _STREAMED and memory[device] > 0]


def _off_gpu_bytes(info: _Model, memory: Mapping[Device, int]) -> int:
    try:
        device_map = _plan_with_reserves(info, memory, fallback=False, offload_buffers=True, warn=False)
    except DeviceMapError:
        return info.sizes[""]
    return sum(info.sizes.get(name, 0) for name, device in device_map.items() if device in _STREAMED)


def _smallest_first_gpu_budget(info: _Model, memory: dict[Device, int], first: Device) -> int:
    """The least budget on ``first`` that keeps as much of the model on the GPUs as its full budget."""
    best = _off_gpu_bytes(info, memory)
    low, high = 0, memory[first]
    while low < high:
        middle = (low + high) // 2
        if _off_gpu_bytes(info, {**memory, first: middle}) <= best:
            high = middle
        else:
            low = middle + 1
    return low


def _balanced_loads(
    info: _Model, memory: Mapping[Device, int], gpus: list[Device]
) -> dict[Device, int] | None:
    """Bytes per GPU when the model is spread evenly over ``gpus`` in whole layers; None if it spills."""
    total = info.sizes[""]
    slots = [
        Slot(gpu, memory[gpu], target=math.ceil(total * (i + 1) / len(gpus))) for i, gpu in enumerate(gpus)
    ]
    slots[-1].target = None
    try:
        Planner(info.model, info.sizes, info.no_split, info.tied, slots).run()
    except NotEnoughMemory:
        return None
    return {slot.device: slot.used for slot in slots}


def _balanced_memory(info: _Model, memory: dict[Device, int], low_zero: bool) -> dict[Device, int]:
    gpus = _gpus(memory)
    if low_zero and len(gpus) > 1:
        first_budget = _smallest_first_gpu_budget(info, memory, gpus[0])
        memory = {**memory, gpus[0]: first_budget}
        if first_budget:
            return memory  # the other GPUs are full: nothing left to balance
        gpus = gpus[1:]
    if len(gpus) < 2 or info.sizes[""] > sum(memory[gpu] for gpu in gpus):
        return memory
    loads = _balanced_loads(info, memory, gpus)
    if loads is None:
        return memory
    return {**memory, **{gpu: min(memory[gpu], loads[gpu]) for gpu in gpus[:-1]}}


def get_balanced_memory(
    model: nn.Module,
    max_memory: Mapping[object, int | str] | None = None,
    no_split_module_classes: NoSplitClasses | None = None,
    dtype: torch.dtype | str | None = None,
    low_zero: bool = False,
) -> dict[Device, int]:
    """A ``max_memory`` whose GPU budgets make an in-order plan spread ``model`` evenly over the GPUs.

    When the model fits on the GPUs, each GPU but the last is capped at its share of the model in whole
    layers (the last keeps its budget); otherwise the budgets come back unchanged. With ``low_zero``,
    GPU 0 gets as little as possible (nothing when the other GPUs hold the model), leaving it room for
    generation. `infer_auto_device_map` with ``strategy="balanced"`` (or ``"balanced_low_0"``) plans
    exactly as ``strategy="sequential"`` does with this budget. Example::

        budget = get_balanced_memory(model, {0: "10GiB", 1: "10GiB", "cpu": "30GiB"}, ["Block"])
        # {0: 3221225472, 1: 10737418240, 'cpu': 32212254720}: a 6 GiB model, 3 GiB per GPU
    """
    info = _Model.of(model, no_split_module_classes, dtype)
    return _balanced_memory(info, get_max_memory(max_memory), low_zero)


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[object, int | str] | None = None,
    no_split_module_classes: NoSplitClasses | None = None,
    dtype: torch.dtype | str | None = None,
    strategy: Strategy = "auto",
    *,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> DeviceMap:
    """Plan where each part of ``model`` goes: GPUs first, then "cpu", then "disk". Returns a flat map.

    Pure: reads only module sizes and ``max_memory`` (measured with `get_max_memory` when None), so it
    works on a model built with `init_empty_weights` and with fake GPUs in ``max_memory``. Modules keep
    model order and are split into children only when they do not fit; classes in
    ``no_split_module_classes`` (names or types, e.g. ``["LlamaDecoderLayer"]``) are never split, and
    tied parameters stay on one device. When layers must be offloaded, the main device (GPU 0, or the
    CPU without GPUs) keeps room for the largest layer that is offloaded, since each is streamed there
    while it runs; the buffers of offloaded layers stay there too unless ``offload_buffers=True``.
    "disk" is unlimited unless ``max_memory`` names it. The map is flat: no entry lies inside another.

    ``strategy``: "sequential" fills GPU 0, then GPU 1, ...; "balanced" spreads the model evenly over
    the GPUs (budgets from `get_balanced_memory`); "balanced_low_0" does the same but keeps GPU 0 as
    empty as possible, leaving it room for generation; "auto" is "balanced" with several GPUs, else
    "sequential". ``fallback_allocation=True`` lets a device that would stay empty (its next layer is
    too big) take a later piece that fits. Example::

        with init_empty_weights():
            model = MyModel()
        infer_auto_device_map(model, {0: "2GiB", 1: "2GiB", "cpu": "8GiB"}, ["Block"])
        # {'embed': 0, 'blocks.0': 0, ..., 'blocks.9': 1, 'blocks.10': 'cpu', 'head': 'cpu'}
    """
    if strategy not in STRATEGIES:
        raise DeviceMapError(f"strategy={strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}")
    memory = get_max_memory(max_memory)
    info = _Model.of(model, no_split_module_classes, dtype)
    balanced = strategy in ("balanced", "balanced_low_0") or (strategy == "auto" and len(_gpus(memory)) > 1)
    if balanced:
        memory = _balanced_memory(info, memory, low_zero=strategy == "balanced_low_0")
    return _plan_with_reserves(info, memory, fallback=fallback_allocation, offload_buffers=offload_buffers)
