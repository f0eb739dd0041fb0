"""Durable file primitives: fsync, atomic replacement, streaming checksums, size strings."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ._crc import crc32c

_CHUNK = 4 << 20
_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def fsync_file(path: Path) -> None:
    """Flush a file's data to stable storage (works on a read-only descriptor on Linux and macOS)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the directory entries of `path` (creations, renames, deletions) durable; no-op on Windows."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Crc:
    """A CRC (zlib's CRC-32 or CRC-32C) behind hashlib's update/hexdigest interface."""

    def __init__(self, fn: Callable[[memoryview, int], int]) -> None:
        self.fn = fn
        self.value = 0

    def update(self, data: memoryview) -> None:
        self.value = self.fn(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def checksum(path: Path, algorithm: str = "crc32c") -> str:
    """The hex digest of a file ("crc32c", "crc32", "sha256" or "blake2b"), read in chunks into one reused
    buffer (constant memory; the hashing releases the GIL, so several files can be hashed in threads).
    Checkpoints checksum their files as they write and read them; this is for files written by others."""
    digest: Any
    if algorithm == "crc32c":
        digest = _Crc(crc32c)
    elif algorithm == "crc32":
        digest = _Crc(zlib.crc32)
    else:
        digest = hashlib.new(algorithm)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return str(digest.hexdigest())


def temp_sibling(path: Path, prefix: str = ".tmp") -> Path:
    """A fresh hidden name next to `path`: `<prefix>-<name>-<random>` (the random part uses os.urandom,
    so it never disturbs the run's seeded random generators)."""
    return path.parent / f"{prefix}-{path.name}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed over `path`.

    A crash at any moment leaves either the old file or the new one at `path`, never a partial one. ::

        with atomic_path(target) as tmp:
            safetensors.torch.save_file(tensors, tmp)
    """
    tmp = temp_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def parse_size(size: int | str) -> int:
    """Bytes in a size given as an int or a string like "10GB", "500MB" or "2GiB" (GB = 10**9 bytes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if match is None:
            raise CheckpointError(
                f"cannot read the size {size!r}; give bytes as an int or a string such as '10GB', '500MB' "
                "or '2GiB'."
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2) or "B"])
    if value <= 0:
        raise CheckpointError(f"the size {size!r} must be positive.")
    return value
