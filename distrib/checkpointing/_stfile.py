"""The safetensors file format, written and read by distrib's own I/O (checksummed on the fly).

A safetensors file is an 8-byte little-endian header length, a JSON header (`{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`, padded with spaces to a multiple of 8 bytes) and
the tensors' bytes back to back. Files written here load with `safetensors.torch.load_file`. Writing goes
straight from each tensor's memory to the file (no serialized copy); reading goes straight from the file
into the destination tensors (the prepared model's parameters) when their dtype, shape and layout match.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointCorruptError, CheckpointError
from ._io import DurableFile, Ledger, Ranges

_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}  # fmt: skip
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _NAMES.items() if hasattr(torch, v)}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 << 20


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    ledger: Ledger,
    *,
    defer_sync: bool = False,
) -> None:
    """Write contiguous CPU `tensors` as a safetensors file through a `DurableFile` (fsynced, recorded)."""
    # larger elements first keeps every tensor aligned to its element size, as safetensors itself does
    order = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    header: dict[str, Any] = {}
    offset = 0
    for name, t in order:
        if t.dtype not in _CODES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store.")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with DurableFile(path, ledger, defer_sync=defer_sync) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, t in order:
            f.write(tensor_bytes(t))


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offsets from the start of the file
    end: int


class SafetensorsFile:
    """The parsed header of a safetensors file; `read()` fetches the tensors, checked against the manifest.

    The header is parsed before it is verified (to plan the reads); `read()` reads it again as part of the
    checksummed bytes and refuses the file if it changed. Example::

        file = SafetensorsFile(path, size)
        tensors = file.read(crc, destinations=model.state_dict())
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._raw, self.entries, self.metadata = _parse(path, size)

    def read(
        self, crc: int | None, destinations: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every tensor of the file by name; where `destinations` has a tensor of the same dtype and shape
        in contiguous CPU memory, the bytes are read straight into it and it is returned. Raises
        `CheckpointCorruptError` (after reading) when the file does not match `crc`."""
        out: dict[str, torch.Tensor] = {}
        header = bytearray(len(self._raw))
        with Ranges(self.path, self.size, crc) as ranges:
            ranges.read_into(memoryview(header))
            for name, entry in sorted(self.entries.items(), key=lambda kv: kv[1].begin):
                target = (destinations or {}).get(name)
                if not _fits(target, entry):
                    target = torch.empty(entry.shape, dtype=entry.dtype)
                assert target is not None
                out[name] = target
                ranges.read_into(tensor_bytes(target))
        if bytes(header) != self._raw:
            raise CheckpointCorruptError(f"{str(self.path)!r} changed while it was read; load it again.")
        return out


def _fits(target: torch.Tensor | None, entry: Entry) -> bool:
    return (
        target is not None
        and target.device.type == "cpu"
        and target.dtype == entry.dtype
        and tuple(target.shape) == entry.shape
        and target.is_contiguous()
        and not target.is_conj()
        and not target.is_neg()
    )


def _parse(path: Path, size: int) -> tuple[bytes, dict[str, Entry], dict[str, str]]:
    def bad(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{str(path)!r} is not a valid safetensors file: {why}.")

    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 <= length <= min(_MAX_HEADER, size - 8):
                raise bad("its header length is out of range")
            raw = prefix + f.read(length)
    except OSError as e:
        raise CheckpointCorruptError(f"cannot read {str(path)!r}: {e.strerror or e}") from e
    try:
        header = json.loads(raw[8:])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not a mapping of strings")
    entries = {name: _entry(name, value, len(raw), bad) for name, value in header.items()}
    _check_layout(entries, len(raw), size, bad)
    return raw, entries, metadata


def _entry(name: str, value: Any, start: int, bad: Any) -> Entry:
    try:
        dtype = DTYPES[value["dtype"]]
        shape = tuple(int(d) for d in value["shape"])
        begin, end = (int(o) for o in value["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"the entry {name!r} is malformed ({type(e).__name__}: {e})") from e
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if min(shape, default=0) < 0 or end - begin != nbytes:
        raise bad(f"the entry {name!r} has {end - begin} bytes for shape {list(shape)} of {dtype}")
    return Entry(dtype, shape, start + begin, start + end)


def _check_layout(entries: dict[str, Entry], start: int, size: int, bad: Any) -> None:
    position = start
    for name, entry in sorted(entries.items(), key=lambda kv: kv[1].begin):
        if entry.begin != position:
            raise bad(f"the entry {name!r} does not follow the previous one")
        position = entry.end
    if position != size:
        raise bad(f"the tensors end at byte {position}, the file has {size}")
