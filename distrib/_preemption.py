"""Preemption: SIGTERM or SIGUSR1 on any rank makes every rank save the same step and exit with code 75.

Clusters announce a preemption with a signal (SLURM's `--signal=USR1@90`, Kubernetes and torchrun's agent
with SIGTERM), to all ranks or to a few. The scope installs handlers that only raise a flag; the ranks agree
on it at an optimizer-step boundary, which is when a prepared dataloader fetches the first batch of a new
accumulation window after an optimizer step. The agreement is an asynchronous all-reduce started at one
boundary and read at the next, so it never waits on the step's critical path; every rank reads the same
result at the same boundary, so all of them save the same step: `save_state()` into the project layout
(the `project_dir` setting), then `SystemExit(preemption_exit_code)` (75, `EX_TEMPFAIL`: "try again"),
which `distrib launch` passes on. A relaunch resumes with `load_state("latest")`.

Batches with no optimizer step between them (an evaluation pass, inference) would pay one all-reduce per
batch for nothing; there the gap between agreements doubles from one batch up to `idle_every`, a count
the ranks agreed on in the previous all-reduce (each rank proposes as many batches as it fetches in
`IDLE_SECONDS`, and the smallest proposal wins), so a signal during evaluation is acted on within about
that time and a pass of n batches costs about log2(n) + n / idle_every all-reduces. Every choice of where
to agree depends only on what all ranks share (batch counts, optimizer steps, agreed values), never on
one rank's clock, so the all-reduces always match.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .errors import CollectiveMismatchError, DistribWarning

if TYPE_CHECKING:
    from ._runtime import Runtime

SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)
_KEY = "preemption"
#: without optimizer steps, agree about this often (in batches fetched, agreed between the ranks)
IDLE_SECONDS = 0.2
#: ... but at least every this many batches
MAX_IDLE_EVERY = 64


@dataclass(eq=False)
class Preemption:
    """The flag a signal raises, and the all-reduce in flight that shares it."""

    requested: int = 0  # the signal number, once one arrived
    pending: Any = None  # (work, tensor) of the all-reduce started at the previous boundary
    device: torch.device | None = None  # where the flag travels (see _agreement_device)
    previous_handlers: dict[int, Any] = field(default_factory=dict)
    runtime_state: Any = None  # the scope's state: is a prepared dataloader iterating?
    steps_seen: int | None = None  # optimizer steps at the last agreement; None: agree at the next boundary
    since_agreement: int = 0  # boundaries since the last agreement
    idle_every: int = 1  # agreed: the most boundaries between agreements while no optimizer steps
    gap: int = 1  # boundaries from the last agreement to the next one while no optimizer steps
    agreed_at: float = 0.0  # when this rank started the last agreement (for its proposal only)
    where: int = 0  # which prepared loader, at which batch, started the agreement in flight

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now, as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not self.requested:
            self.requested = signum
            print(
                f"distrib: received {signal.Signals(signum).name}; saving a checkpoint at the next optimizer "
                "step, then exiting with the preemption exit code",
                file=sys.stderr,
                flush=True,
            )
            if getattr(self.runtime_state, "active_dataloader", None) is None:
                print(
                    "distrib: no prepared dataloader is iterating now: the ranks agree on the signal when one "
                    "fetches its next batch. A loop that reads no prepared dataloader is not stopped by it "
                    "(prepare() your DataLoader, or a second signal stops this process at once)",
                    file=sys.stderr,
                    flush=True,
                )


def install(runtime: Runtime) -> None:
    """Catch the preemption signals for the scope's lifetime (main thread only; Python's rule)."""
    if (
        runtime.settings.preemption_exit_code is None
        or threading.current_thread() is not threading.main_thread()
    ):
        return
    state = Preemption(runtime_state=runtime.state)
    for signum in SIGNALS:
        state.previous_handlers[signum] = signal.signal(signum, state.handle)
    _rearm_launcher_stack_dump()
    runtime.state.extensions[_KEY] = state
    runtime.call_on_close(lambda: _uninstall(state))


def _rearm_launcher_stack_dump() -> None:
    """Under `distrib launch` a worker dumps its stacks when SIGTERM arrives (a rank stuck in C code never
    runs a Python handler); keep that dump in front of the handler installed here."""
    if "distrib._launch.records" in sys.modules:
        from ._launch import records

        records.rearm_stack_dump()


def _uninstall(state: Preemption) -> None:
    if state.pending is not None:  # every rank started it at the same boundary: it completes; then the
        work, _ = state.pending  # process group is no longer held by it and can be destroyed
        state.pending = None
        work.wait()
    for signum, handler in state.previous_handlers.items():
        signal.signal(signum, handler)
    state.previous_handlers.clear()
    _rearm_launcher_stack_dump()


def at_step_boundary(runtime: Runtime, loader: Any) -> None:
    """Called by prepared dataloaders before the first batch of each accumulation window."""
    state: Preemption | None = runtime.state.extensions.get(_KEY)
    if state is None:
        return
    if runtime.world_size == 1:
        if state.requested:
            _save_and_exit(runtime, state)
        return
    state.since_agreement += 1
    steps = runtime.state.optimizer_steps
    stepped = state.steps_seen is None or steps != state.steps_seen
    if not stepped and state.since_agreement < state.gap:
        return
    agreed = _read_pending(state, runtime.rank)
    if agreed:
        _save_and_exit(runtime, state)
    state.gap = 1 if stepped else min(2 * state.gap, state.idle_every)
    now = time.monotonic()
    period = (now - state.agreed_at) / state.since_agreement if state.agreed_at else 0.0
    proposal = min(MAX_IDLE_EVERY, max(1, math.ceil(IDLE_SECONDS / period))) if period > 0 else 1
    state.steps_seen, state.since_agreement, state.agreed_at = steps, 0, now
    if state.device is None:
        state.device = _agreement_device(runtime)
    # one all-reduce (MAX) carries the flag, the smallest proposal for idle_every (negated), and the
    # largest and smallest of where the ranks are, which differ when one runs a loader the others do not
    state.where = _where(runtime, loader)
    message = torch.tensor(
        [state.requested, -proposal, state.where, -state.where],
        dtype=torch.int64,
        device=state.device,
    )
    state.pending = (dist.all_reduce(message, op=dist.ReduceOp.MAX, async_op=True), message)


def _where(runtime: Runtime, loader: Any) -> int:
    """Which prepared loader (in the order of preparation), how many batches into this iteration: equal
    on every rank in step (a resumed loader's own batch count may differ between ranks; this does not)."""
    index = next(
        (
            i
            for i, other in enumerate(runtime.state.dataloaders)
            if loader in (other, getattr(other, "loader", None))
        ),
        255,
    )
    done = int(getattr(loader, "batches_yielded", 0)) - int(getattr(loader, "start_batch", 0))
    return (index << 32) | (done & 0xFFFFFFFF)


def loader_ended(runtime: Runtime) -> None:
    """A prepared loader whose ranks had different numbers of batches (a ragged tail) ended: the ranks may
    have taken different numbers of optimizer steps in that tail, so the next boundary agrees on every
    rank, whatever each one's step count says."""
    state: Preemption | None = runtime.state.extensions.get(_KEY)
    if state is not None:
        state.steps_seen = None


def _agreement_device(runtime: Runtime) -> torch.device:
    """A CPU tensor whenever the group carries CPU tensors (gloo, also next to NCCL as CUDA runs have it):
    then reading the flag at every step never waits for the accelerator's queue."""
    return torch.device("cpu") if "gloo" in str(dist.get_backend()) else runtime.collective_device


def _read_pending(state: Preemption, rank: int) -> int:
    """Wait for the agreement in flight; adopt its `idle_every` and return the agreed signal (0: none)."""
    if state.pending is None:
        return 0
    work, message = state.pending
    state.pending = None
    work.wait()
    signum, negated, most, fewest = message.tolist()
    if most != -fewest:
        raise CollectiveMismatchError(
            f"the ranks' prepared dataloaders are out of step: on rank {rank}, prepared dataloader "
            f"#{state.where >> 32} (in the order they were prepared) reached an optimizer-step boundary that "
            "another rank reached elsewhere. A prepared DataLoader was iterated on some ranks only (for example "
            "an evaluation under `if ctx.rank == 0:`), and the collective it makes at each step boundary (the "
            "preemption agreement) has no partner on the others. Iterate prepared dataloaders on every rank "
            "(gather_for_metrics() collects the results), or iterate the plain, unprepared DataLoader on the "
            "one rank."
        )
    state.idle_every = -negated
    return int(signum)


def _save_and_exit(runtime: Runtime, state: Preemption) -> None:
    from .checkpointing import save_state

    code = runtime.settings.preemption_exit_code
    if runtime.settings.project_dir is None:
        if runtime.rank == 0:
            warnings.warn(
                "preempted, but no checkpoint was saved: the project_dir setting is not set, so save_state() "
                "has nowhere to go. Set distributed(project_dir=...) to resume where preemption stopped.",
                DistribWarning,
                stacklevel=2,
            )
    else:
        path = save_state()
        if runtime.rank == 0:
            print(f"distrib: preempted; saved {path}; exiting with code {code}", file=sys.stderr, flush=True)
    raise SystemExit(code)
