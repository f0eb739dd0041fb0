"""DeepSpeed's JIT build locks: never wait silently on a lock that an interrupted build left behind.

torch builds JIT extensions (DeepSpeed's `deepspeed_shm_comm` on its first CPU run, its Adam ops on
first use) under `<extensions root>/<name>/`, guarded by an empty `lock` file created with `O_EXCL`.
A build that is interrupted (Ctrl-C, a killed job) leaves the file behind, and every later run waits for
it to disappear, forever, at 0% CPU, printing nothing. The extensions root is `$TORCH_EXTENSIONS_DIR`,
else `~/.cache/torch_extensions/py<version>_<accelerator>`.

`check_before_build(runtime)` runs before DeepSpeed initialises. For each lock under the root:

* a process on this machine holds it open (a build in progress): say so, with its pid, and let it finish;
* no process holds it, and it lies on a local file system (or is older than a build can take): it is
  stale; remove it (one rank per machine, or rank 0 for a shared file system) and warn;
* no local process holds it, on a shared file system, and it is recent: another machine may be building;
  say so, with the path and the command to remove it if not.

The check ends with a barrier, so no rank starts a build while another still decides. For the rest of
the scope (DeepSpeed builds some ops when first used), a watcher reports every 30 s that the scope's
thread waits inside torch's `FileBaton.wait`, for which lock, and whether a process holds it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ._environment import torch_extensions_directory
from ._runtime import Runtime
from .errors import DistribWarning

#: a lock older than this is stale even where other machines could hold it (builds take ~30 s to minutes)
MAX_BUILD_SECONDS = 900.0
#: file systems shared between machines: a lock there may belong to another machine's build
SHARED_FILE_SYSTEMS = (
    "nfs", "nfs4", "cifs", "smbfs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p",
    "afs", "panfs", "wekafs", "cvmfs",
)  # fmt: skip


@dataclass(frozen=True)
class LockState:
    """What is known about one lock file."""

    path: Path
    age_seconds: float
    holders: tuple[int, ...]  # pids on this machine that have it open
    shared: bool  # on a file system other machines can see

    @property
    def stale(self) -> bool:
        if self.holders:
            return False
        return not self.shared or self.age_seconds > MAX_BUILD_SECONDS


def extensions_root(environ: dict[str, str] | None = None) -> Path:
    """Where torch builds JIT extensions (as `torch.utils.cpp_extension` decides)."""
    chosen = torch_extensions_directory(environ)
    if chosen is not None:
        return chosen
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def find_locks(root: Path) -> list[Path]:
    """Every extension's build lock under `root`."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/lock") if p.is_file())


def holders(path: Path, proc: Path = Path("/proc")) -> tuple[int, ...]:
    """Pids of this machine's processes that have `path` open (those whose /proc entry we may read)."""
    try:
        target = os.stat(path)
    except OSError:
        return ()
    found = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    st = os.stat(fd)
                    if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                        found.append(int(entry.name))
                        break
    return tuple(found)


def file_system_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system `path` lives on (from /proc/mounts; "" when unknown)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    resolved = str(path.resolve())
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def is_shared(kind: str) -> bool:
    return kind in SHARED_FILE_SYSTEMS or kind.startswith("fuse")


def inspect_lock(path: Path, mounts: str | None = None) -> LockState | None:
    """The state of one lock file, or None when it is gone."""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    return LockState(path, max(0.0, age), holders(path), is_shared(file_system_type(path, mounts)))


def describe(state: LockState) -> str:
    """What the lock means and what to do, in one message."""
    if state.holders:
        pids = ", ".join(map(str, state.holders))
        return (
            f"DeepSpeed's JIT build lock {state.path} is held by process {pids} on this machine (a build in "
            f"progress, {state.age_seconds:.0f} s so far): waiting for it to finish."
        )
    if state.stale:
        return (
            f"removed a stale DeepSpeed JIT build lock {state.path}: no process holds it (left by an "
            f"interrupted build {state.age_seconds:.0f} s ago); without this the run would wait for it forever."
        )
    return (
        f"DeepSpeed's JIT build lock {state.path} is {state.age_seconds:.0f} s old and no process on this "
        "machine holds it; it is on a shared file system, so another machine may be building. If no other "
        f"machine is, it was left by an interrupted build: stop the run and remove it (rm {state.path}). "
        f"distrib removes it itself once it is {MAX_BUILD_SECONDS:.0f} s old."
    )


def _decides(runtime: Runtime, shared: bool) -> bool:
    """One rank per machine decides for a local root; rank 0 alone for a shared one."""
    return runtime.rank == 0 if shared else runtime.local_rank == 0


def clear_stale(root: Path, runtime: Runtime, mounts: str | None = None) -> list[LockState]:
    """Inspect every lock under `root`; remove the stale ones (if this rank decides). Returns the states."""
    states = [s for s in (inspect_lock(p, mounts) for p in find_locks(root)) if s is not None]
    for state in states:
        if not _decides(runtime, state.shared):
            continue
        if state.stale:
            with contextlib.suppress(FileNotFoundError):
                os.remove(state.path)
            warnings.warn(describe(state), DistribWarning, stacklevel=3)
        else:
            _say(f"distrib: {describe(state)}")
    return states


def check_before_build(runtime: Runtime) -> None:
    """Before DeepSpeed initialises: clear stale build locks, let every rank continue together, and watch
    for the rest of the scope whether this process waits on a build lock (DeepSpeed builds some ops only
    when they are first used). Called by the DeepSpeed strategy's `setup()`. Example::

        check_before_build(runtime)
        deepspeed.init_distributed(...)
    """
    root = extensions_root()
    clear_stale(root, runtime)
    if runtime.world_size > 1 and dist.is_initialized():
        dist.barrier()  # no rank may start a build while another still removes a stale lock
    runtime.state.closers.append(watch(threading.get_ident()))


def watch(thread_id: int, every: float = 30.0) -> Callable[[], None]:
    """Report every `every` seconds that the thread waits on a build lock; returns the function that stops it."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            waiting = _waited_lock(thread_id)
            state = inspect_lock(waiting) if waiting is not None else None
            if state is None:
                continue
            if state.stale:  # the build it guarded died while this process waited: stop waiting
                with contextlib.suppress(FileNotFoundError):
                    os.remove(state.path)
                _say(
                    f"distrib: {describe(state)} If loading the op fails now (its build never finished), run "
                    "again: the next run builds it."
                )
            else:
                _say(f"distrib: still waiting for a JIT build lock: {describe(state)}")

    threading.Thread(target=run, name="distrib-build-lock-watch", daemon=True).start()
    return stop.set


def _waited_lock(thread_id: int) -> Path | None:
    """The lock file the thread is waiting on inside torch's `FileBaton.wait`, if it is."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("file_baton.py"):
            baton = frame.f_locals.get("self")
            path = getattr(baton, "lock_file_path", None)
            return Path(path) if path else None
        frame = frame.f_back
    return None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
