"""What a worker leaves for its launcher, and the guards that tie a worker's life to its launcher.

`distrib launch` (and `notebook_launcher`) create one diagnostics directory per attempt of the worker
group and export it as `DISTRIB_DIAGNOSTICS_DIR`; the stall watchdog (`distrib._diagnosis`, when present)
dumps each rank's stacks and collective ledger there. The worker bootstrap adds, under `launcher/`:

* `rank-<R>.json`: how the worker left by itself (returned, `sys.exit`, an exception): its exit code, the
  time, and the optimizer step a failing `distributed()` scope was at (`distrib_optimizer_step`, put on
  the exception by the scope). The launcher reads these to tell a rank that exited early from the one
  that then failed waiting for it, and to stop crash loops (the same step failing after a restart).
* `stack-rank-<R>.txt`: every thread's Python stack, written by `faulthandler` when SIGTERM arrives (the
  launcher stopping a worker that was still running), so a rank stuck outside a collective is named with
  its file and line.

A worker dies with its launcher: on Linux `prctl(PR_SET_PDEATHSIG, SIGTERM)` signals it when the launcher
is gone (even after a SIGKILL that leaves the launcher no time to stop it), and a daemon thread that
watches the launcher's pid (`DISTRIB_LAUNCHER_PID`, also where prctl is missing) kills the worker with
SIGKILL `DISTRIB_GRACE_PERIOD` seconds later if it is still alive: time to save on SIGTERM, never an orphan.

Only the standard library is imported here: the bootstrap runs this before the user's first line.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

DIAGNOSTICS_VARIABLE = "DISTRIB_DIAGNOSTICS_DIR"
LAUNCHER_PID_VARIABLE = "DISTRIB_LAUNCHER_PID"
GRACE_VARIABLE = "DISTRIB_GRACE_PERIOD"
SUBDIRECTORY = "launcher"
#: the attribute a `distributed()` scope sets on an exception leaving it: the optimizer step it was at
STEP_ATTRIBUTE = "distrib_optimizer_step"
_PR_SET_PDEATHSIG = 1
_WATCH_INTERVAL_S = 1.0

_stack_file: list[TextIO] = []  # kept open: faulthandler writes to its file descriptor from a signal handler


@dataclass(frozen=True)
class WorkerRecord:
    """How one worker left by itself, as it wrote it."""

    rank: int
    exit_code: int
    time: float
    step: int | None = None
    how: str = "exit"


# -- in the worker ---------------------------------------------------------------------------------------


def install_worker_guards() -> None:
    """Tie this worker's life to its launcher and prepare the stack dump on SIGTERM (idempotent)."""
    launcher = os.environ.get(LAUNCHER_PID_VARIABLE, "")
    if launcher.isdigit():
        _die_with_launcher(int(launcher), _float(os.environ.get(GRACE_VARIABLE), 30.0))
    directory = _own_directory()
    if directory is not None and not _stack_file:
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            handle = open(directory / f"stack-rank-{_rank()}.txt", "w")  # noqa: SIM115 - kept open on purpose
            _stack_file.append(handle)
            # chain=True: after the dump the default action (or an earlier handler) still runs
            faulthandler.register(signal.SIGTERM, file=handle, all_threads=True, chain=True)
            # a forked child (a DataLoader worker) must not dump into this rank's file when the launcher
            # stops the whole process group
            os.register_at_fork(after_in_child=_forget_stack_dump)


def rearm_stack_dump() -> None:
    """Put the SIGTERM stack dump back in front after something installed a Python handler for SIGTERM
    (the scope's preemption handler): faulthandler dumps first, then chains to that handler."""
    if not _stack_file:
        return
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        # faulthandler.register keeps an existing registration without re-installing its low-level
        # handler, so a Python handler set since then would stay in front; and unregister puts back the
        # handler that was there before faulthandler's first registration. So: take faulthandler off, put
        # the Python handler back at the OS level, and register again: it dumps, then chains to that.
        handler = signal.getsignal(signal.SIGTERM)
        faulthandler.unregister(signal.SIGTERM)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
        faulthandler.register(signal.SIGTERM, file=_stack_file[0], all_threads=True, chain=True)


def _forget_stack_dump() -> None:
    with contextlib.suppress(RuntimeError, ValueError):
        faulthandler.unregister(signal.SIGTERM)
    _stack_file.clear()


def record_exit(exit_code: int, exc: BaseException | None = None, *, how: str = "exit") -> None:
    """Write this worker's `rank-<R>.json` (atomically; a no-op outside a distrib launch)."""
    directory = _own_directory()
    if directory is None:
        return
    data = {
        "rank": _rank(),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0") or 0),
        "pid": os.getpid(),
        "exit_code": exit_code,
        "time": time.time(),
        "step": failed_step(exc),
        "how": how,
    }
    target = directory / f"rank-{data['rank']}.json"
    temporary = target.with_name(f".{target.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        temporary.write_text(json.dumps(data))
        os.replace(temporary, target)


def failed_step(exc: BaseException | None) -> int | None:
    """The optimizer step recorded on `exc` (or on an exception it was raised from) by a failing scope."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        step = getattr(exc, STEP_ATTRIBUTE, None)
        if isinstance(step, int):
            return step
        exc = exc.__cause__ or exc.__context__
    return None


def _die_with_launcher(launcher_pid: int, grace: float) -> None:
    if os.getppid() != launcher_pid:  # the launcher is already gone (or this is not its child)
        if not _pid_alive(launcher_pid):
            os.kill(os.getpid(), signal.SIGTERM)
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    watcher = threading.Thread(
        target=_watch_launcher, args=(launcher_pid, grace), name="distrib-launcher-watch", daemon=True
    )
    watcher.start()


def _watch_launcher(launcher_pid: int, grace: float) -> None:
    """Daemon thread: once the launcher is gone, SIGTERM (where prctl did not already), then SIGKILL after
    the grace period, so a worker that ignores or outlives SIGTERM never stays behind."""
    while os.getppid() == launcher_pid:
        time.sleep(_WATCH_INTERVAL_S)
    if not sys.platform.startswith("linux"):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_directory() -> Path | None:
    base = os.environ.get(DIAGNOSTICS_VARIABLE)
    if not base:
        return None
    directory = Path(base) / SUBDIRECTORY
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory


def _rank() -> int:
    text = os.environ.get("RANK", "0")
    return int(text) if text.isdigit() else 0


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text else default
    except ValueError:
        return default


# -- in the launcher ---------------------------------------------------------------------------------------


def read_records(directory: Path | None) -> dict[int, WorkerRecord]:
    """The exit records the workers of one attempt wrote, by rank (unreadable files are skipped)."""
    out: dict[int, WorkerRecord] = {}
    if directory is None:
        return out
    for path in (directory / SUBDIRECTORY).glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(path.read_text())
            step = data.get("step")
            out[int(data["rank"])] = WorkerRecord(
                rank=int(data["rank"]),
                exit_code=int(data["exit_code"]),
                time=float(data["time"]),
                step=step if isinstance(step, int) else None,
                how=str(data.get("how", "exit")),
            )
    return out


def read_stack(directory: Path | None, rank: int) -> str:
    """The stacks a worker dumped when the launcher's SIGTERM reached it ("" if none)."""
    if directory is None:
        return ""
    try:
        return (directory / SUBDIRECTORY / f"stack-rank-{rank}.txt").read_text(errors="replace").strip()
    except OSError:
        return ""


def main_thread(stack: str) -> list[str]:
    """The lines of the main thread's stack in a faulthandler dump (its header first): the thread that was
    not started by `threading` (every other thread's outermost frame is threading's `_bootstrap`)."""
    blocks = [b.strip().splitlines() for b in stack.split("\n\n") if b.strip()]
    threads = [b for b in blocks if b and b[0].startswith(("Thread 0x", "Current thread 0x"))]
    if not threads:
        return []
    started = [t for t in threads if not any("threading.py" in line and "_bootstrap" in line for line in t)]
    return (started or threads)[-1]


def stuck_frame(stack: str) -> str | None:
    """`path/to/file.py:LINE (in function)`: the innermost frame of the main thread in a faulthandler dump
    that is the user's code (not the standard library, installed packages, or distrib)."""
    for line in main_thread(stack)[1:]:  # faulthandler lists the most recent call first
        frame = line.strip()
        path = frame.split('"')[1] if frame.count('"') >= 2 else ""
        if path and not _library_path(path):
            number, _, function = (
                frame.split(", line ", 1)[1].partition(" in ") if ", line " in frame else ("?", "", "")
            )
            return f"{path}:{number.strip()}" + (f" (in {function.strip()})" if function else "")
    return None


_PACKAGE = str(Path(__file__).resolve().parents[1]).replace("\\", "/") + "/"


def _library_path(path: str) -> bool:
    """Frames that are not the user's: the standard library, installed packages and distrib itself (a user
    stuck in a distrib or torch call is named at their own call site)."""
    normal = path.replace("\\", "/")
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return (
        normal.startswith("<")
        or "/site-packages/" in normal
        or "/dist-packages/" in normal
        or normal.startswith(_PACKAGE)
        or any(normal.startswith(p.replace("\\", "/") + "/lib") for p in prefixes)
    )
