"""Background saves: one save in flight per run, its outcome never lost.

`save_state(background=True)` snapshots the state and hands the rest (writing, checksums, manifest,
publishing, rotation) to the run's saver thread. The saver agrees with the other ranks on a process group
of its own (gloo), so its collectives never interleave with the training loop's. The next `save_state`,
a `load_state`, and the scope's exit wait for the save in flight; an error it raised is raised there, on
every rank, unless `SaveHandle.wait()` already raised it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from ._writer import Snapshots

if TYPE_CHECKING:
    from .._runtime import Runtime

_KEY = "distrib.checkpointing.saver"


class SaveHandle:
    """The save that `save_state(..., background=True)` started. `wait()` blocks until the checkpoint is
    in place and returns its path (or raises the save's error); `done()` says whether it finished.

    Example::

        handle = save_state(background=True)   # returns once the state is snapshotted
        ...                                    # train on; the files are written meanwhile
        path = handle.wait()                   # the checkpoint is complete (or its error is raised)
    """

    def __init__(self, path: Path, future: Future[None]) -> None:
        self.path = path
        self._future = future
        self._delivered = False

    def done(self) -> bool:
        """True once the save finished, successfully or not."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Path:
        """Wait until the checkpoint is complete; returns its path. Raises the save's error (once: the
        next save and the scope's exit then do not raise it again)."""
        try:
            self._future.result(timeout)
        except TimeoutError:
            raise
        except BaseException:
            self._delivered = True
            raise
        return self.path

    def _undelivered_error(self) -> BaseException | None:
        """The save's error if nobody has seen it yet (waits for the save to finish)."""
        error = self._future.exception()
        if error is None or self._delivered:
            return None
        self._delivered = True
        return error

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"SaveHandle({str(self.path)!r}, {state})"


class Saver:
    """Per-run state of background saves: the thread, its process group, the snapshot buffers."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.snapshots = Snapshots()
        self.handle: SaveHandle | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._group: Any = None
        self._lock = threading.Lock()

    def group(self) -> Any:
        """The saver's process group (created collectively on first use; None on one process)."""
        if self._group is None and self.runtime.world_size > 1:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def settle(self) -> None:
        """Wait for the save in flight; raise its error if nobody has seen it yet (every rank agreed on
        the outcome, so every rank raises)."""
        handle, self.handle = self.handle, None
        if handle is None:
            return
        error = handle._undelivered_error()
        if error is not None:
            raise error

    def start(self, path: Path, work: Callable[[], None]) -> SaveHandle:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="distrib-save", initializer=_yield_to_training
                )
            self.handle = SaveHandle(path, self._executor.submit(work))
        return self.handle

    def close(self) -> None:
        """At scope exit: finish the save in flight (raising its error), then release the thread."""
        try:
            self.settle()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._group is not None and dist.is_initialized():
                dist.destroy_process_group(self._group)
            self._group = None


def _yield_to_training() -> None:
    """Lower the saver thread's CPU priority (Linux: per thread), so that where cores are scarce the
    training loop keeps running at full speed and the save takes the CPU time left over."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def saver(runtime: Runtime) -> Saver:
    """The run's saver (created, with a closer on the scope, on first use)."""
    extensions = runtime.state.extensions
    found = extensions.get(_KEY)
    if found is None:
        found = extensions[_KEY] = Saver(runtime)
        runtime.state.closers.append(found.close)
    return found  # type: ignore[no-any-return]


def settle(runtime: Runtime) -> None:
    """Wait for this run's save in flight, if any, raising its error if nobody has seen it yet."""
    found = runtime.state.extensions.get(_KEY)
    if found is not None:
        found.settle()
