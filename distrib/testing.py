"""Run a function on N real CPU processes over gloo, for tests (yours and ours).

`run_ranks` starts fresh interpreters (spawn), gives each the torch.distributed environment variables of
its rank, collects every rank's return value or traceback, and enforces a timeout: a hang fails fast with
the stack of every rank that was still running, instead of waiting out the process-group timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["RanksFailed", "free_port", "run_ranks"]


class RanksFailed(AssertionError):
    """One or more ranks raised, crashed or hung; the message holds every rank's report."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    environ: dict[str, str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: Any,
) -> None:
    import faulthandler
    import signal
    import sys

    os.environ.update(environ)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
    # the parent sends SIGUSR2 before it gives up on a hung rank: print every thread's stack (SIGUSR1 and
    # SIGTERM announce a preemption, which a scope catches)
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    try:
        value = fn(*args, **kwargs)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None
    # plain pickle bytes: a tensor sent as-is would travel through shared memory that dies with this process
    results.put((rank, True, pickle.dumps(value)))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` processes; return the values, ordered by rank.

    `fn` must be importable (a module-level function). Each process sees `RANK`, `LOCAL_RANK`,
    `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`, as under torchrun, plus `env`.
    Raises `RanksFailed` with every rank's traceback if any rank fails or the timeout passes. Example::

        def check():
            with distributed() as ctx:
                return gather(torch.tensor([ctx.rank])).tolist()

        assert run_ranks(check, 2) == [[0, 1], [0, 1]]
    """
    environ = {
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [
        context.Process(target=_worker, args=(fn, r, world_size, environ, args, kwargs, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    reports = _collect(procs, results, timeout)
    failed = {r: v for r, (ok, v) in reports.items() if not ok}
    if failed or len(reports) < world_size:
        raise RanksFailed(_describe(procs, reports, timeout))
    # the bytes come from the child processes this call just started, not from outside
    return [pickle.loads(reports[r][1]) for r in range(world_size)]


def _collect(procs: list[Any], results: Any, timeout: float) -> dict[int, tuple[bool, Any]]:
    reports: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    first_failure: float | None = None
    while len(reports) < len(procs) and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=0.1)
            reports[rank] = (ok, value)
            if not ok and first_failure is None:
                first_failure = time.monotonic()
        except queue.Empty:
            pass
        crashed = [p for p in procs if p.exitcode not in (None, 0)]
        if crashed and first_failure is None:
            first_failure = time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > 3.0:
            break  # the others are most likely blocked in a collective with the failed rank
    for p in procs:
        p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        os.kill(p.pid, signal.SIGUSR2)  # each hung rank prints its stacks to stderr
    time.sleep(1.0 if hung else 0.0)
    for p in hung:
        p.terminate()
        p.join(5)
    return reports


def _describe(procs: list[Any], reports: dict[int, tuple[bool, Any]], timeout: float) -> str:
    lines = []
    for rank, p in enumerate(procs):
        if rank in reports and reports[rank][0]:
            lines.append(f"rank {rank}: finished")
        elif rank in reports:
            lines.append(f"rank {rank}: raised\n{reports[rank][1]}")
        else:
            lines.append(
                f"rank {rank}: no result (exit code {p.exitcode}; crashed, or hung and stopped after "
                f"{timeout:.0f} s: its stacks are in the captured stderr above)"
            )
    return "\n".join(lines)
