"""Sizes and memory budgets: parse "10GiB", measure modules, find what each device can hold."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import psutil
import torch
from torch import nn

from ..errors import DeviceMapError

Device = int | str
"""A GPU index (``0``), ``"cpu"``, ``"disk"`` or another torch device string such as ``"mps"``."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def parse_size(value: int | float | str, *, what: str = "size") -> int:
    """Turn ``"10GiB"``, ``"500MB"``, ``"1.5GB"``, ``"1024"`` or ``1024`` into a number of bytes."""
    if isinstance(value, bool):
        raise DeviceMapError(f"{what}={value!r} is not a size; give bytes (1024) or a string like '10GiB'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise DeviceMapError(f"{what}={value!r} is negative; give a size of at least 0, e.g. '10GiB'")
        return int(value)
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise DeviceMapError(
            f"{what}={value!r} is not a size; write it as bytes (1073741824) or with a unit, "
            "e.g. '10GiB', '500MB', '1.5GB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def format_size(num_bytes: float) -> str:
    """Human-readable size in binary units, e.g. ``format_size(3 * 2**30) == "3.00 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.2f} TiB"


def to_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept ``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"bf16"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, _DTYPE_NAMES.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise DeviceMapError(f"dtype={dtype!r} is not a torch dtype; use e.g. torch.bfloat16 or 'float16'")
    return value


def normalize_device(device: object, *, where: str) -> Device:
    """Bring a device spelling to its canonical form: GPU index, "cpu", "disk" or a torch device string."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if isinstance(device, str):
        if device in ("cpu", "disk"):
            return device
        try:
            parsed = torch.device(device)
        except RuntimeError:
            parsed = None
        if parsed is not None and parsed.type == "cuda":
            return parsed.index or 0
        if parsed is not None and parsed.type != "meta":
            return str(parsed)
    raise DeviceMapError(
        f"{where} = {device!r} is not a device; use a GPU index such as 0, 'cuda:1', 'cpu' or 'disk'"
    )


def torch_device(device: Device) -> torch.device:
    """The torch device a placement runs on: ``0`` -> ``cuda:0``; "disk" has none."""
    if device == "disk":
        raise DeviceMapError("'disk' is storage, not a device that runs layers")
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def device_order(devices: Iterable[Device]) -> list[Device]:
    """GPUs by index first, then other accelerators, then "cpu", then "disk"."""

    def rank(device: Device) -> tuple[int, int, str]:
        if isinstance(device, int):
            return (0, device, "")
        return ({"cpu": 2, "disk": 3}.get(device, 1), 0, device)

    return sorted(devices, key=rank)


def get_max_memory(max_memory: Mapping[object, int | str] | None = None) -> dict[Device, int]:
    """What each device may hold, in bytes, ordered GPUs, then "cpu", then "disk".

    With no argument, measures the free memory of every visible CUDA GPU and the available RAM. With a
    mapping, parses its sizes and device names and uses only the devices it names (so fake GPUs work for
    planning on a machine without any). Example::

        get_max_memory({0: "10GiB", 1: "10GiB", "cpu": "30GB"})
        # {0: 10737418240, 1: 10737418240, 'cpu': 30000000000}
        get_max_memory()  # on a laptop: {'cpu': 12884901888}
    """
    if max_memory is None:
        found: dict[Device, int] = {}
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                found[index] = torch.cuda.mem_get_info(index)[0]
        found["cpu"] = psutil.virtual_memory().available
        return found
    parsed: dict[Device, int] = {}
    for key, size in max_memory.items():
        device = normalize_device(key, where=f"max_memory key {key!r}")
        parsed[device] = parse_size(size, what=f"max_memory[{key!r}]")
    return {device: parsed[device] for device in device_order(parsed)}


def compute_module_sizes(model: nn.Module, dtype: torch.dtype | str | None = None) -> dict[str, int]:
    """Bytes held by every module and tensor of ``model``, keyed by name ("" is the whole model).

    Tied parameters count once, under the first name that holds them. With ``dtype``, floating-point
    tensors are counted as if converted to it. Works on models built with `init_empty_weights`.
    Example::

        sizes = compute_module_sizes(nn.Sequential(nn.Linear(4, 4)), dtype=torch.float16)
        sizes[""], sizes["0"], sizes["0.weight"]  # (40, 40, 32)
    """
    dtype = to_dtype(dtype)
    sizes: dict[str, int] = {name: 0 for name, _ in model.named_modules()}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        itemsize = (
            dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        )
        size = tensor.numel() * itemsize
        parts = name.split(".")
        for depth in range(len(parts) + 1):
            prefix = ".".join(parts[:depth])
            sizes[prefix] = sizes.get(prefix, 0) + size
    return sizes
