"""The stall watchdog: when no rank makes progress for `stall_timeout` seconds, every rank dumps its
state, the run gets one merged diagnosis naming the rank that is not in the collective, and it ends.

Each rank runs one daemon thread that wakes every `stall_timeout / 10` seconds (at most every 5 s) and
samples, without touching the training thread: the collectives it finished (the ledger), its optimizer
steps, the position of the dataloader it iterates, where its scope thread's Python code is, and, when
the rank computes on the CPU, that thread's CPU time outside collectives (a rank inside one long C call,
or spinning in a loop whose frame the sampler happens to catch at the same instruction, is busy, not
stuck). On an accelerator the CPU time is left out: a wait behind a hung NCCL kernel spins the CPU
(CUDA's default), and that wait is what the watchdog is for. Any change is progress. A rank that has
seen none for `stall_timeout` counts itself idle in the process group's store; when every rank is idle (a rank that left the run counts as idle) the run is stalled:

* every rank writes its dump (`_diagnosis.py`) into `DISTRIB_DIAGNOSTICS_DIR` when `distrib launch` set
  one (the launcher prints the merged diagnosis), else prints it to stderr;
* every rank also sends a summary through the store, and rank 0 prints the merged diagnosis (outside
  `distrib launch`) or writes it next to the dumps, so runs under torchrun or `run_ranks` get one too;
* each process then exits with status 124 (`_diagnosis.STALL_EXIT_CODE`), rank 0 last, once it has
  every dump: a hung collective cannot be interrupted, and waiting for torch's process-group timeout
  would only burn the allocation.

A rank that spins in Python keeps changing its frame (and on the CPU burns CPU time) and so is not idle:
such a hang ends at the process-group timeout (`timeout`) instead. Costs nothing on the training thread; one store request per
rank per wake-up while idle.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import _diagnosis, _store
from ._ledger import Ledger
from ._runtime import Runtime

_IDLE = "watchdog/idle"
_STALL = "watchdog/stall"
_DUMPED = "watchdog/dumped"
_DONE = "watchdog/reported"
#: how long rank 0 waits for the others' dumps before it reports what it has
COLLECT_SECONDS = 10.0
#: the share of a sampling interval the scope thread must spend on the CPU to count as busy
BUSY_CPU_SHARE = 0.05


class Watchdog:
    """One rank's stall watchdog; `start()` with the scope, `stop()` when it closes."""

    def __init__(
        self, runtime: Runtime, ledger: Ledger, stall_timeout: float, directory: Path | None
    ) -> None:
        self.runtime = runtime
        self.ledger = ledger
        self.timeout = stall_timeout
        self.directory = directory
        self.interval = min(5.0, max(0.1, stall_timeout / 10))
        self.scope_thread = threading.get_ident()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distrib-stall-watchdog", daemon=True)
        self.idle = False
        self._exit = os._exit  # replaced in tests that must not end the process
        self._cpu_seen: tuple[float | None, float] = (None, 0.0)
        self._cpu_counts = runtime.device.type == "cpu"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)

    # -- sampling --------------------------------------------------------------------------------
    def _sample(self) -> tuple[Any, ...]:
        state = self.runtime.state
        loader = state.active_dataloader
        position = (id(loader), getattr(loader, "epoch", None), getattr(loader, "batches_yielded", None))
        frame = sys._current_frames().get(self.scope_thread)
        where = (id(frame), frame.f_lasti) if frame is not None else None
        return (self.ledger.completed, state.optimizer_steps, position, where)

    def _busy(self) -> bool:
        """Whether the scope thread spent CPU outside a collective since the last call."""
        if not self._cpu_counts:
            return False
        cpu, now = _thread_cpu_time(self.scope_thread), time.monotonic()
        (cpu_before, then), self._cpu_seen = self._cpu_seen, (cpu, now)
        if cpu is None or cpu_before is None or self.ledger.current is not None:
            return False
        return cpu - cpu_before >= BUSY_CPU_SHARE * (now - then)

    def _run(self) -> None:
        try:
            self._watch()
        except Exception as exc:  # a watchdog must never take the run down by itself
            print(f"distrib: the stall watchdog stopped: {exc!r}", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        store = _store.group_store()
        group = _default_group()
        world = self.runtime.world_size
        last, since = self._sample(), time.monotonic()
        while not self._stopped.wait(self.interval):
            if _default_group() is not group:
                return  # the scope's process group is gone: its scope closed without stopping this thread
            sample, now = self._sample(), time.monotonic()
            if self._busy() or sample != last:
                last, since = sample, now
            idle_for = now - since
            self._set_idle(store, idle_for >= self.timeout)
            declared = _store.exists(store, _STALL)
            if not declared and self.idle:
                count = _store.add(store, _IDLE, 0)
                declared = count is None or count >= world  # no store left: nobody can answer any more
                if declared:
                    _store.put(store, _STALL, {"rank": self.runtime.rank})
            if declared and not self._stopped.is_set():
                self._on_stall(store, idle_for)
                return

    def _set_idle(self, store: Any, idle: bool) -> None:
        if idle != self.idle:
            self.idle = idle
            _store.add(store, _IDLE, 1 if idle else -1)

    # -- the stall -------------------------------------------------------------------------------
    def _on_stall(self, store: Any, idle_for: float) -> None:
        runtime = self.runtime
        dump = _diagnosis.make_dump(
            rank=runtime.rank,
            world_size=runtime.world_size,
            stall_timeout=self.timeout,
            idle_seconds=idle_for,
            thread_id=self.scope_thread,
            in_collective=self.ledger.in_progress(),
            last_collectives=self.ledger.last_entries(),
            optimizer_steps=runtime.state.optimizer_steps,
        )
        if self.directory is not None:
            path = _diagnosis.write_dump(self.directory, dump)
            _say(
                f"distrib: rank {runtime.rank} made no progress for {idle_for:.0f} s; its state is in {path}"
            )
        else:
            _say(_diagnosis.format_dump(dump))
        _store.put(store, f"watchdog/dump/{runtime.rank}", _diagnosis.summary(dump))
        _store.add(store, _DUMPED, 1)
        if runtime.rank == 0:
            self._report(store, dump)
            _store.put(store, _DONE, {"rank": 0})
        else:  # stay until rank 0 has everything: a rank that exits breaks the others' collectives at once
            _wait_until(lambda: _store.exists(store, _DONE), COLLECT_SECONDS + 5)
        self._exit(_diagnosis.STALL_EXIT_CODE)

    def _report(self, store: Any, own: dict[str, Any]) -> None:
        """Rank 0: wait for the others' dumps, then print (or write) the merged diagnosis."""
        world = self.runtime.world_size
        _wait_until(lambda: (_store.add(store, _DUMPED, 0) or 0) >= world, COLLECT_SECONDS)
        found = _store.get_many(store, [f"watchdog/dump/{r}" for r in range(world)])
        dumps = {int(d["rank"]): d for d in found.values()}
        dumps[own["rank"]] = own
        for record in _store.get_many(store, [f"left/{r}" for r in range(world)]).values():
            # a rank that left the run (it raised, or called sys.exit) dumps nothing, but said why
            dumps.setdefault(
                int(record["rank"]), {"rank": record["rank"], "world_size": world, "left": record["reason"]}
            )
        if self.directory is not None:
            _diagnosis.write_dump(
                self.directory, {"rank": "collected", "dumps": list(dumps.values())}, "collected.json"
            )
        else:
            _say(_diagnosis.merge(dumps))


def _thread_cpu_time(thread_id: int) -> float | None:
    """The CPU time a thread has used (POSIX); None where the platform cannot tell or it ended."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread_id))
    except (AttributeError, OSError):
        return None


def _default_group() -> Any:
    try:
        return dist.distributed_c10d._get_default_group() if dist.is_initialized() else None
    except (RuntimeError, ValueError):
        return None


def _wait_until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.1)


def _say(text: str) -> None:
    try:  # one write, so the dumps of ranks sharing a terminal do not interleave mid-line
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
