"""Zero-copy tensors over files: safetensors headers, memory maps, and page prefetching.

A streamed layer's weights are views of a fresh private memory map of the file that holds them (the
checkpoint's own safetensors shard, or a raw ``.dat`` file of an offload folder). Nothing is copied:
the pages come from the page cache, and when the layer's tensors are dropped the map goes with them, so
the process keeps no pages of layers that are not running. `read_ahead_pages` asks the kernel to start
reading a tensor's pages into the page cache (``MADV_WILLNEED``) and returns at once, so the next layer's
disk reads overlap the current layer's compute.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
}
_MADV_WILLNEED = 3
_GAP = 1 << 20
_SAMPLES = 8
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class Extent:
    """Where a tensor's bytes lie in a file, and how to view them."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, Extent]:
    """The tensors of a safetensors file and where their bytes lie, from its JSON header alone."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as a safetensors file: {exc}") from exc
    start = 8 + length
    extents: dict[str, Extent] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {entry.get('dtype')!r}, which torch cannot view"
            )
        begin, end = entry["data_offsets"]
        extents[key] = Extent(start + begin, end - begin, dtype, tuple(entry["shape"]))
    return extents


def map_tensors(path: Path, extents: list[Extent]) -> list[torch.Tensor]:
    """Views of ``extents`` over one private (copy-on-write) map of ``path``; the map lives while they do."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            whole = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    except OSError as exc:
        raise CheckpointError(f"cannot map {path}: {exc}; was the file moved or deleted?") from exc
    tensors = []
    for extent in extents:
        if extent.offset + extent.nbytes > size:
            raise CheckpointError(
                f"{path} is shorter than its index says ({size} bytes, a tensor ends at "
                f"{extent.offset + extent.nbytes}); the file was truncated or replaced: reload the checkpoint"
            )
        if extent.nbytes == 0 or whole is None:
            tensors.append(torch.empty(extent.shape, dtype=extent.dtype))
            continue
        raw = torch.frombuffer(whole, dtype=torch.uint8, count=extent.nbytes, offset=extent.offset)
        if extent.offset % extent.dtype.itemsize:
            raw = raw.clone()  # misaligned for this dtype (not written by safetensors): copy instead
        tensors.append(raw.view(extent.dtype).view(extent.shape))
    return tensors


class _Madvise:
    """``madvise(2)`` on a tensor's pages through ctypes (a no-op where libc or madvise is missing)."""

    def __init__(self, advice: int) -> None:
        self.advice = advice
        self.call = None
        name = ctypes.util.find_library("c")
        if name is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        libc = ctypes.CDLL(name, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.mincore.restype = ctypes.c_int
        self.call = libc.madvise
        self.mincore = libc.mincore
        self.vector = ctypes.create_string_buffer(1)

    def __call__(self, tensors: list[torch.Tensor]) -> None:
        """Advise on the pages of ``tensors``, in one call when they lie close together (as a layer's do)."""
        ranges = sorted(
            (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel()
        )
        if self.call is None or not ranges:
            return
        spans = [[ranges[0][0], ranges[0][1]]]
        for start, end in ranges[1:]:
            if start - spans[-1][1] <= _GAP:  # the kernel's fixed cost per call outweighs a short gap
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        for start, end in spans:
            aligned = start // _PAGE * _PAGE
            if not self.cached(aligned, end):
                self.call(aligned, end - aligned, self.advice)

    def cached(self, start: int, end: int) -> bool:
        """True when sampled pages of the range are in the page cache: then reading ahead has nothing to
        do but costs a walk over every page (about 0.5 ms per 28 MB), so it is skipped."""
        pages = (end - start + _PAGE - 1) // _PAGE
        for index in range(_SAMPLES):
            page = start + (pages - 1) * index // max(1, _SAMPLES - 1) * _PAGE
            if self.mincore(page, _PAGE, self.vector) != 0 or not self.vector.raw[0] & 1:
                return False
        return True


read_ahead_pages = _Madvise(_MADV_WILLNEED)
"""Start reading mapped tensors' pages into the page cache and return at once (asynchronous I/O).

About 0.1 ms per call when the pages are cached already, so a layer's tensors go in one call."""
