"""Where each tensor of a model lives under a device map, and the checks that make a map valid.

A device map is ``{name: device}`` where a name is a module or tensor of the model ("" is the whole
model). A tensor is placed by the longest name in the map that is a prefix of its own name, so a more
specific entry given by a user overrides its parent's. Maps that distrib hands out (planned maps,
``model.hf_device_map``) are *flat*: `flatten_device_map` rewrites any valid map so that no entry lies
inside another, and a module whose tensors all share one device is a single entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeviceMapError
from ._memory import Device, normalize_device

DeviceMap = dict[str, Device]
"""``{module_or_tensor_name: device}``, e.g. ``{"embed": 0, "layers.0": "cpu", "head": "disk"}``."""

_SHOWN = 12


@dataclass(frozen=True)
class TensorSlot:
    """One name under which a module holds a tensor (tied parameters have several slots)."""

    name: str
    module: nn.Module
    attr: str
    is_param: bool
    persistent: bool

    @property
    def tensor(self) -> torch.Tensor:
        store = self.module._parameters if self.is_param else self.module._buffers
        value = store[self.attr]
        assert value is not None
        return value

    def put(self, value: torch.Tensor) -> None:
        """Make the module hold ``value`` under this slot's name."""
        if self.is_param:
            assert isinstance(value, nn.Parameter)
            self.module._parameters[self.attr] = value
        else:
            self.module._buffers[self.attr] = value


def tensor_slots(model: nn.Module) -> list[TensorSlot]:
    """Every (module, name) that holds a parameter or buffer, tied duplicates included."""
    slots = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, param in module._parameters.items():
            if param is not None:
                slots.append(TensorSlot(prefix + attr, module, attr, True, True))
        for attr, buffer in module._buffers.items():
            if buffer is not None:
                persistent = attr not in module._non_persistent_buffers_set
                slots.append(TensorSlot(prefix + attr, module, attr, False, persistent))
    return slots


def group_by_tensor(slots: list[TensorSlot]) -> list[list[TensorSlot]]:
    """Slots grouped by the tensor object they hold; a group of several is a set of tied names."""
    groups: dict[int, list[TensorSlot]] = {}
    for slot in slots:
        groups.setdefault(id(slot.tensor), []).append(slot)
    return list(groups.values())


def tied_parameter_names(model: nn.Module) -> list[list[str]]:
    """Names of parameters that share one tensor, e.g. ``[["embed.weight", "head.weight"]]``."""
    groups = group_by_tensor([slot for slot in tensor_slots(model) if slot.is_param])
    return [[slot.name for slot in group] for group in groups if len(group) > 1]


def replace_tensor(group: list[TensorSlot], value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` into every slot of a tied group (so ties hold), wrapped as a parameter if needed."""
    first = group[0].tensor
    if group[0].is_param and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=first.requires_grad)
    for slot in group:
        slot.put(value)
    return value


def is_under(name: str, prefix: str) -> bool:
    """True when ``name`` is ``prefix`` or lies inside it ("" contains everything)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def lookup(device_map: Mapping[str, Device], name: str) -> Device | None:
    """The device of the longest entry of ``device_map`` that contains ``name``."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        key = ".".join(parts[:depth])
        if key in device_map:
            return device_map[key]
    return None


def shorten(names: list[str]) -> str:
    """A list of names for an error message, cut after a dozen."""
    shown = ", ".join(repr(name) for name in names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"[{shown}]{more}"


def _iter_unknown(model: nn.Module, device_map: Mapping[str, Device]) -> Iterator[str]:
    known = {name for name, _ in model.named_modules(remove_duplicate=False)}
    known.update(slot.name for slot in tensor_slots(model))
    return (key for key in device_map if key not in known)


def check_device_map(model: nn.Module, device_map: Mapping[str, object]) -> DeviceMap:
    """Validate ``device_map`` against ``model`` and return it with devices in canonical form.

    Raises `DeviceMapError` naming the entries that are not in the model, the modules the map leaves
    unassigned, devices that are not devices, and tied parameters split across devices.
    """
    if not isinstance(device_map, Mapping):
        raise DeviceMapError(
            f"device_map must be a dict such as {{'': 'cpu'}}, got {type(device_map).__name__}"
        )
    normalized = {str(k): normalize_device(v, where=f"device_map[{k!r}]") for k, v in device_map.items()}
    unknown = list(_iter_unknown(model, normalized))
    if unknown:
        top = [name for name, _ in model.named_children()]
        raise DeviceMapError(
            f"device_map names {shorten(unknown)}, which the model does not have; use module or tensor "
            f"names from model.named_modules() (top level: {shorten(top)})"
        )
    placements = tensor_placements(model, normalized)
    _check_tied(model, placements)
    return normalized


def tensor_placements(model: nn.Module, device_map: Mapping[str, Device]) -> dict[str, Device]:
    """``{tensor_name: device}`` for every tensor of the model; raises if any is left unassigned."""
    placements: dict[str, Device] = {}
    unassigned: list[str] = []
    for slot in tensor_slots(model):
        device = lookup(device_map, slot.name)
        if device is None:
            unassigned.append(slot.name)
        else:
            placements[slot.name] = device
    if unassigned:
        names = _outermost_unassigned(device_map, unassigned)
        raise DeviceMapError(
            f"device_map leaves these modules unassigned: {shorten(names)}; add them to the map "
            f"(e.g. {{{names[0]!r}: 'cpu'}}), add a parent module, or pass device_map='auto'"
        )
    return placements


def _outermost_unassigned(device_map: Mapping[str, Device], tensors: list[str]) -> list[str]:
    """For each unassigned tensor, the outermost module that the map does not touch at all."""

    def untouched(module: str) -> bool:
        return lookup(device_map, module) is None and not any(is_under(key, module) for key in device_map)

    names: list[str] = []
    for tensor in tensors:
        parts = tensor.split(".")
        prefixes = (".".join(parts[:depth]) for depth in range(1, len(parts)))
        name = next((prefix for prefix in prefixes if untouched(prefix)), tensor)
        if name not in names:
            names.append(name)
    return names


def _check_tied(model: nn.Module, placements: Mapping[str, Device]) -> None:
    for names in tied_parameter_names(model):
        devices = {placements[name] for name in names}
        if len(devices) > 1:
            where = ", ".join(f"{name!r} on {placements[name]!r}" for name in names)
            raise DeviceMapError(
                f"tied parameters are placed on different devices ({where}); put the modules that hold "
                "them on the same device, or let infer_auto_device_map keep them together"
            )


def check_devices_exist(device_map: Mapping[str, Device]) -> None:
    """Raise if the map names a GPU this process cannot see."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for name, device in device_map.items():
        if isinstance(device, int) and device >= count:
            raise DeviceMapError(
                f"device_map puts {name!r} on GPU {device}, but this process sees {count} CUDA device(s); "
                "use 'cpu' or 'disk' for it, or check CUDA_VISIBLE_DEVICES"
            )


def _devices_below(model: nn.Module, placements: Mapping[str, Device]) -> dict[str, set[Device]]:
    """For every module name, the devices its tensors (tied names included) are placed on."""
    below: dict[str, set[Device]] = {name: set() for name, _ in model.named_modules(remove_duplicate=False)}
    for tensor, device in placements.items():
        parts = tensor.split(".")
        for depth in range(len(parts)):
            below.setdefault(".".join(parts[:depth]), set()).add(device)
    return below


def flatten_device_map(model: nn.Module, device_map: Mapping[str, Device]) -> DeviceMap:
    """The same placement as ``device_map``, written flat: no entry is a module inside another entry.

    A module whose tensors all go to one device is one entry; a module whose tensors are spread is
    replaced by its own tensors and its children, recursively. Modules that hold no tensors keep the
    device the map gives them (and are left out when it gives none). Entries come in model order.
    Example::

        flatten_device_map(model, {"": "cpu", "head": "disk"})
        # {'embed': 'cpu', 'blocks': 'cpu', 'head': 'disk'}
    """
    placements = tensor_placements(model, device_map)
    below = _devices_below(model, placements)
    flat: DeviceMap = {}
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        devices = below.get(name, set())
        if len(devices) <= 1:
            device = next(iter(devices)) if devices else lookup(device_map, name)
            if device is not None:
                flat[name] = device
            continue
        prefix = f"{name}." if name else ""
        for attr, value in (*module._parameters.items(), *module._buffers.items()):
            if value is not None:
                flat[prefix + attr] = placements[prefix + attr]
        stack.extend(reversed([(prefix + c, m) for c, m in module._modules.items() if m is not None]))
    return flat


def is_flat(device_map: Mapping[str, object]) -> bool:
    """True when no entry of ``device_map`` lies inside another entry (``""`` contains everything)."""
    names = set(device_map)
    for name in names:
        parts = name.split(".") if name else []
        if any(".".join(parts[:depth]) in names for depth in range(len(parts))):
            return False
    return True
