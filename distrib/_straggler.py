"""The straggler report: where each rank's time goes, compared across ranks every N optimizer steps.

With `straggler_report_every=N`, each rank splits its wall time into

* **data wait**: time inside the prepared dataloader's fetch of the next batch;
* **communication wait**: time inside distrib's collectives, plus the part of each `backward()` that
  comes after the local gradient computation finished (DDP, FSDP and DeepSpeed wait for their gradient
  reductions there; a final autograd callback marks the moment);
* **compute**: the rest (forward, backward, optimizer, your own code).

At the first `backward()` after every N-th optimizer step the ranks all-gather these figures (one small
checked collective), and ranks whose busy time (data wait + compute) per step is more than
`straggler_threshold` (default 20%) above the median are flagged with the phase that makes them slow.
A slow rank makes the others wait, so its communication wait is the *lowest*: it is shown, not used to
flag. The report goes to the `distrib.straggler` logger (INFO; a flagged rank at WARNING, main process)
and, when trackers are running, to `log()` as `straggler/rank_<r>/<phase>_ms` per step.

Cost when off: one dict lookup per `backward()`; when on, a few microseconds per `backward()` and per
batch, and one small collective every N steps.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ._agreement import Collective, ledger_of
from ._ledger import fixed_site
from ._logging import get_logger
from ._runtime import Runtime
from .errors import DistribWarning

KEY = "straggler"
PHASES = ("data", "compute", "comm")
_LABELS = {"data": "data wait", "compute": "compute", "comm": "communication wait"}
_SITE = fixed_site("straggler report (at backward)")
#: a rank must be at least this much slower per step (seconds) to be flagged: below it is noise
MIN_EXCESS = 1e-4
_logger = get_logger("distrib.straggler")


class StepTimer:
    """One rank's time split for the current report window."""

    def __init__(self, runtime: Runtime, every: int, threshold: float) -> None:
        self.every = every
        self.threshold = threshold
        self.last_report: dict[str, Any] | None = None
        self.runtime = runtime
        self.started = False  # the first window opens at the first batch or backward, not at setup
        self._reset(runtime)

    def _reset(self, runtime: Runtime) -> None:
        self.data = 0.0
        self.backward_comm = 0.0
        self.start = time.perf_counter()
        self.comm_start = ledger_of(runtime).comm_seconds
        self.steps_start = runtime.state.optimizer_steps
        self.next_report = self.steps_start + self.every

    def batches(self, iterator: Iterator[Any]) -> Iterator[Any]:
        """`iterator`, timing each fetch."""
        clock = time.perf_counter
        if not self.started:
            self.started = True
            self._reset(self.runtime)
        while True:
            start = clock()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data += clock() - start
            yield batch

    def backward(self, runtime: Runtime, loss: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """The strategy's backward, with the wait for gradient synchronisation measured."""
        if not self.started:
            self.started = True
            self._reset(runtime)
        elif runtime.state.optimizer_steps >= self.next_report and runtime.world_size > 1:
            self.report(runtime)
        marks: list[float] = []
        node = loss.grad_fn
        handle = None
        if node is not None:
            # the loss's node runs first; a final callback queued now runs once the whole local backward is
            # done, before the callbacks DDP and FSDP queue later to wait for their reductions
            def mark(_: Any) -> None:
                torch.autograd.Variable._execution_engine.queue_callback(
                    lambda: marks.append(time.perf_counter())
                )

            handle = node.register_prehook(mark)
        try:
            runtime.strategy_module.backward(runtime, loss, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        if marks:
            self.backward_comm += time.perf_counter() - marks[0]

    def report(self, runtime: Runtime) -> dict[str, Any]:
        """All-gather this window's figures, flag stragglers, log the report; start a new window."""
        steps = max(1, runtime.state.optimizer_steps - self.steps_start)
        wall = time.perf_counter() - self.start
        comm = ledger_of(runtime).comm_seconds - self.comm_start + self.backward_comm
        compute = max(0.0, wall - self.data - comm)
        mine = torch.tensor([self.data, compute, comm, wall], dtype=torch.float64) / steps
        with Collective(runtime, "straggler report", _SITE, [mine]) as agreement:
            assert agreement.rows is not None
            table = agreement.rows.reshape(runtime.world_size, 4).tolist()
        report = analyse(table, self.threshold, runtime.state.optimizer_steps)
        self.last_report = report
        _publish(runtime, report)
        self._reset(runtime)
        return report


def analyse(table: list[list[float]], threshold: float, step: int) -> dict[str, Any]:
    """Per rank seconds per step `[data, compute, comm, wall]` -> the report, with the flagged ranks."""
    per_rank = [dict(zip((*PHASES, "total"), row)) for row in table]
    busy = [r["data"] + r["compute"] for r in per_rank]
    median_busy = statistics.median(busy)
    medians = {p: statistics.median(r[p] for r in per_rank) for p in PHASES}
    flagged = []
    for rank, figures in enumerate(per_rank):
        excess = busy[rank] - median_busy
        if median_busy > 0 and excess > threshold * median_busy and excess > MIN_EXCESS:
            phase = max(("data", "compute"), key=lambda p: figures[p] - medians[p])
            flagged.append({"rank": rank, "slower": excess / median_busy, "phase": phase})
    return {"step": step, "ranks": per_rank, "medians": medians, "flagged": flagged, "threshold": threshold}


def format_report(report: dict[str, Any]) -> str:
    """The report as a small table, flagged ranks marked."""
    flags = {f["rank"]: f for f in report["flagged"]}
    lines = [
        f"straggler report at optimizer step {report['step']} (milliseconds per step; flagged: more than "
        f"{report['threshold']:.0%} slower than the median in data wait + compute):",
        "  rank  data wait    compute  comm wait      total",
    ]
    for rank, r in enumerate(report["ranks"]):
        row = f"  {rank:>4}  {r['data'] * 1e3:9.2f}  {r['compute'] * 1e3:9.2f}  {r['comm'] * 1e3:9.2f}  {r['total'] * 1e3:9.2f}"
        if rank in flags:
            f = flags[rank]
            row += f"  <- {f['slower']:.0%} slower than the median, in {_LABELS[f['phase']]}"
        lines.append(row)
    return "\n".join(lines)


def _publish(runtime: Runtime, report: dict[str, Any]) -> None:
    text = format_report(report)
    if report["flagged"]:
        _logger.warning(text)
    else:
        _logger.info(text)
    if "tracking" not in runtime.state.extensions:
        return
    from ._tracking import log

    values: dict[str, float] = {}
    for rank, r in enumerate(report["ranks"]):
        for phase in PHASES:
            values[f"straggler/rank_{rank}/{phase}_ms"] = r[phase] * 1e3
    slowest = max(report["flagged"], key=lambda f: f["slower"], default=None)
    values["straggler/flagged_ranks"] = float(len(report["flagged"]))
    if slowest is not None:
        values["straggler/slowest_rank"] = float(slowest["rank"])
        values["straggler/slowest_excess"] = slowest["slower"]
    log(values, step=report["step"])


def timed_batches(runtime: Runtime, iterator: Iterator[Any]) -> Iterator[Any]:
    """The prepared dataloader's batches, with each fetch timed when the straggler report is on."""
    timer = runtime.state.extensions.get(KEY)
    return iterator if timer is None else timer.batches(iterator)


def start(runtime: Runtime) -> None:
    every = runtime.settings.straggler_report_every
    if every is not None and runtime.world_size > 1:
        timer = runtime.state.extensions[KEY] = StepTimer(
            runtime, every, runtime.settings.straggler_threshold
        )
        runtime.state.closers.append(lambda: _warn_if_silent(runtime, timer))


def _warn_if_silent(runtime: Runtime, timer: StepTimer) -> None:
    """A report that was asked for and never made must not pass in silence."""
    if timer.last_report is None and runtime.state.optimizer_steps >= timer.every:
        warnings.warn(
            f"straggler_report_every={timer.every} was set and the run made {runtime.state.optimizer_steps} "
            "optimizer steps, but no straggler report was made: the report is exchanged inside distrib's "
            "backward(loss); call it instead of loss.backward().",
            DistribWarning,
            stacklevel=2,
        )
