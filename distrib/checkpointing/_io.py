"""Checkpoint file I/O at disk speed: checksums of the bytes as they are written and read, in threads.

`DurableFile` is a write-only stream (what `torch.save`, DCP and the safetensors writer write into): large
writes are split into pieces that threads checksum and `pwrite` at their offsets in parallel (hashing and
the system calls release the GIL); small writes are gathered into one buffer. Closing it fsyncs the file
once and records its size and CRC-32C in a `Ledger`, so the manifest is built without reading anything
back. `read_checked` and `read_into` do the reverse: read a file, or ranges of it straight into the memory
of tensors, hashing each piece as it arrives, and compare with the manifest.

Every OS error names the file and the checkpoint; a full disk says "no space left on device".
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import CheckpointCorruptError, CheckpointError
from . import _faults
from ._crc import combine, crc32c, hexdigest

#: writes and reads at least this large are split into pieces handled by several threads
PIECE = 16 << 20
#: small writes are gathered until this many bytes before they go to the file
_BUFFER = 1 << 20
#: pieces are hashed and copied in slices this large, so the second pass finds them in the CPU cache
_SLICE = 2 << 20
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """In a forked child: the parent's I/O threads do not exist there, so start a new pool on first use."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def io_threads() -> int:
    """Threads for checkpoint I/O: enough to keep a fast disk busy, never more than the CPUs."""
    return max(2, min(8, os.cpu_count() or 1))


def pool() -> ThreadPoolExecutor:
    """The process's pool for pieces of files (created on first use). Tasks given to it never wait for
    other tasks of the pool, so it cannot deadlock."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=io_threads(), thread_name_prefix="distrib-ckpt-io")
        return _pool


def os_error(e: OSError, action: str, path: Path | str, checkpoint: Path | str | None) -> CheckpointError:
    """A `CheckpointError` for an OS error that names the file, the checkpoint and, for a full disk, says so."""
    where = f" of the checkpoint {str(checkpoint)!r}" if checkpoint is not None else ""
    if e.errno in _NO_SPACE:
        return CheckpointError(
            f"no space left on device while {action} {str(path)!r}{where} ({e.strerror}); free space or "
            "save elsewhere. Earlier checkpoints are intact."
        )
    return CheckpointError(f"{action} {str(path)!r}{where} failed: {e.strerror or e}")


class Ledger:
    """Size and CRC-32C of every file written through `DurableFile`, by name relative to a directory."""

    def __init__(
        self,
        directory: Path,
        rank: int | None = None,
        checkpoint: Path | None = None,
        *,
        parallel: bool = True,
    ) -> None:
        self.directory = directory
        self.rank = rank
        #: whether large writes fan out over the I/O threads (a background save writes from its own thread
        #: only, leaving the other cores to the training loop)
        self.parallel = parallel
        #: the checkpoint the files are for, named in errors (its final path, not the temporary one)
        self.checkpoint = checkpoint if checkpoint is not None else directory
        self._entries: dict[str, dict[str, Any]] = {}
        self._syncs: list[Future[None]] = []
        self._lock = threading.Lock()

    def defer(self, sync: Future[None]) -> None:
        """A file's fsync, running in the I/O threads while the next file is written."""
        with self._lock:
            self._syncs.append(sync)

    def record(self, path: Path, size: int, crc: int) -> None:
        name = path.relative_to(self.directory).as_posix()
        with self._lock:
            self._entries[name] = {"size": size, "crc32c": hexdigest(crc)}

    def rename(self, old: Path, new: Path) -> None:
        """A recorded file was renamed (DCP writes `.metadata.tmp`, then renames it)."""
        with self._lock:
            entry = self._entries.pop(old.relative_to(self.directory).as_posix(), None)
            if entry is not None:
                self._entries[new.relative_to(self.directory).as_posix()] = entry

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every file recorded, once all of them are on stable storage (raises a deferred fsync's error)."""
        with self._lock:
            syncs, self._syncs = self._syncs, []
        for sync in syncs:
            sync.result()
        with self._lock:
            return dict(self._entries)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    """Write every byte of `view` at `offset`, hashing it slice by slice; returns its CRC."""
    crc = 0
    for start in range(0, len(view), _SLICE):
        part = view[start : start + _SLICE]
        crc = crc32c(part, crc)
        done = 0
        while done < len(part):
            done += os.pwrite(fd, part[done:], offset + start + done)
    return crc


def _as_bytes(data: Any) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class DurableFile:
    """A new file written with checksums computed on the fly; `close()` fsyncs it and records it.

    It has the stream methods `torch.save`, DCP and `pickle` use (`write`, `tell`, `flush`, `fileno`,
    `close`, a context manager). Example::

        with DurableFile(directory / "optimizer_0.pt", ledger) as f:
            torch.save(state, f)
    """

    def __init__(
        self, path: Path, ledger: Ledger, *, checkpoint: Path | None = None, defer_sync: bool = False
    ) -> None:
        self.path = path
        self._defer_sync = defer_sync
        self.name = str(path)
        self._ledger = ledger
        self._checkpoint = checkpoint if checkpoint is not None else ledger.checkpoint
        self._pos = 0
        self._crc = 0
        self._buffer = bytearray()
        self._closed = False
        self.failure: BaseException | None = None  # kept: torch.save turns it into its own RuntimeError
        try:
            self._fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644
            )
        except OSError as e:
            raise os_error(e, "creating", path, self._checkpoint) from e

    # --- the stream interface ---------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos + len(self._buffer)

    def write(self, data: Any) -> int:
        view = _as_bytes(data)
        n = len(view)
        if n < _BUFFER:
            self._buffer += view
            if len(self._buffer) >= _BUFFER:
                self._drain()
            return n
        self._drain()
        self._put(view)
        return n

    def flush(self) -> None:
        self._drain()

    def fileno(self) -> int:
        self._drain()  # callers fsync through the descriptor: everything written must be in the file
        return self._fd

    def close(self) -> None:
        """Write what is buffered, fsync, close and record the file (once; a failed file is not recorded).
        With `defer_sync`, the fsync runs in the I/O threads and `Ledger.entries()` waits for it."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drain()
        except BaseException:
            os.close(self._fd)
            raise
        self._ledger.record(self.path, self._pos, self._crc)
        if self._defer_sync:
            self._ledger.defer(pool().submit(self._sync_and_close))
        else:
            self._sync_and_close()

    def _sync_and_close(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise os_error(e, "writing", self.path, self._checkpoint) from e
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        """Close without recording (the file is incomplete)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> DurableFile:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        if self.failure is not None and exc_type is not None:
            raise self.failure from exc  # the OS error, not torch's wrapper of it

    # --- internals --------------------------------------------------------------------------------
    def _drain(self) -> None:
        if self._buffer:
            data, self._buffer = memoryview(bytes(self._buffer)), bytearray()
            self._put(data)

    def _put(self, view: memoryview) -> None:
        try:
            if len(view) < 2 * PIECE or not self._ledger.parallel:
                crc = _pwrite_all(self._fd, view, self._pos)
            else:
                crc = self._put_parallel(view)
        except OSError as e:
            self.failure = os_error(e, "writing", self.path, self._checkpoint)
            raise self.failure from e
        self._crc = combine(self._crc, crc, len(view))
        self._pos += len(view)
        _faults.point("during_write", self._ledger.rank)

    def _put_parallel(self, view: memoryview) -> int:
        starts = range(0, len(view), PIECE)
        futures = [pool().submit(_pwrite_all, self._fd, view[s : s + PIECE], self._pos + s) for s in starts]
        crc = 0
        for s, future in zip(starts, futures):
            crc = combine(crc, future.result(), min(PIECE, len(view) - s))
        return crc


# --- reading ---------------------------------------------------------------------------------------


def _pread_into(fd: int, view: memoryview, offset: int, hashing: bool = True) -> int:
    """Fill `view` from the file at `offset`, hashing slice by slice unless told not to; returns the CRC
    (0 when not hashing; EOF is an error)."""
    crc = 0
    for start in range(0, len(view), _SLICE):
        part = view[start : start + _SLICE]
        done = 0
        while done < len(part):
            n = os.preadv(fd, [part[done:]], offset + start + done)
            if n == 0:
                raise EOFError(f"the file ended at byte {offset + start + done}")
            done += n
        if hashing:
            crc = crc32c(part, crc)
    return crc


_scratch = threading.local()


def _hash_range(fd: int, offset: int, length: int) -> int:
    """The CRC of `length` bytes of the file at `offset`, read through this thread's scratch buffer."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = memoryview(bytearray(_SLICE))
    crc = 0
    for start in range(0, length, _SLICE):
        n = min(_SLICE, length - start)
        crc = combine(crc, _pread_into(fd, buffer[:n], offset + start), n)
    return crc


class Ranges:
    """Read consecutive ranges of one file into caller-given buffers, in parallel, and check the file's
    CRC over all of them, when one is expected (the ranges must cover the file from byte 0 to its end, in
    order; `crc=None` checks the size only, and hashes nothing).

    Example::

        with Ranges(path, expected_size, expected_crc) as r:
            r.read_into(header_buffer)
            r.read_into(memoryview(tensor.numpy()).cast("B"))
    """

    def __init__(self, path: Path, size: int, crc: int | None, checkpoint: Path | None = None) -> None:
        self.path = path
        self._size = size
        self._expected = crc
        self._checkpoint = checkpoint
        self._pos = 0
        self._parts: list[tuple[Future[int], int]] = []
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            actual = os.fstat(self._fd).st_size
        except OSError as e:
            raise os_error(e, "opening", path, checkpoint) from e
        if actual != size:
            os.close(self._fd)
            raise CheckpointCorruptError(
                f"{str(path)!r} has {actual} bytes, {size} expected (truncated or overwritten); restore it or "
                "load an earlier checkpoint."
            )

    def read_into(self, view: memoryview) -> None:
        """Queue reading the next `len(view)` bytes of the file into `view`."""
        for start in range(0, len(view), PIECE):
            part = view[start : start + PIECE]
            self._parts.append(
                (pool().submit(_pread_into, self._fd, part, self._pos, self._expected is not None), len(part))
            )
            self._pos += len(part)

    def skip(self, nbytes: int) -> None:
        """Read and hash the next `nbytes` without keeping them (in per-thread scratch buffers); with no
        CRC to check there is nothing to read them for (the size was checked when the file was opened)."""
        if self._expected is None:
            self._pos += nbytes
            return
        end = self._pos + nbytes
        while self._pos < end:
            length = min(end - self._pos, PIECE)
            self._parts.append((pool().submit(_hash_range, self._fd, self._pos, length), length))
            self._pos += length

    def finish(self) -> None:
        """Wait for every read; raise `CheckpointCorruptError` if the bytes do not match the manifest."""
        try:
            crc = 0
            for future, length in self._parts:
                part = future.result()
                if self._expected is not None:
                    crc = combine(crc, part, length)
        except EOFError as e:
            raise CheckpointCorruptError(f"{str(self.path)!r} is shorter than its manifest says: {e}") from e
        except OSError as e:
            raise os_error(e, "reading", self.path, self._checkpoint) from e
        finally:
            os.close(self._fd)
        if self._pos != self._size:
            raise CheckpointCorruptError(
                f"{str(self.path)!r}: {self._pos} bytes read, the manifest lists {self._size}."
            )
        if self._expected is not None and crc != self._expected:
            raise CheckpointCorruptError(
                f"{str(self.path)!r} does not match its crc32c checksum (the file is corrupted); restore it "
                "or load an earlier checkpoint."
            )

    def __enter__(self) -> Ranges:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            for future, _ in self._parts:
                future.cancel()
            for future, _ in self._parts:
                if not future.cancelled():
                    future.exception()
            os.close(self._fd)


def read_checked(path: Path, size: int, crc: int | None, checkpoint: Path | None = None) -> bytearray:
    """The whole file, read in parallel pieces and checked against its size and CRC (None: size only)."""
    buffer = bytearray(size)
    with Ranges(path, size, crc, checkpoint) as ranges:
        ranges.read_into(memoryview(buffer))
    return buffer


def map_in_threads(fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
    """`fn` over `items` in short-lived threads of their own (safe for tasks that use `pool()` inside)."""
    if len(items) <= 1:
        return iter([fn(item) for item in items])
    with ThreadPoolExecutor(max_workers=min(len(items), io_threads())) as executor:
        return iter(list(executor.map(fn, items)))
