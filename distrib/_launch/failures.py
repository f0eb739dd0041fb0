"""Turn the elastic agent's failure records into one report that blames the right rank.

torch's agent returns, for a failed attempt, each failed global rank's `ProcessFailure` (exit code, pid,
and the error file the worker bootstrap wrote with its traceback). When one worker fails the agent stops
the others, which then appear as failures too. The report names the cause, in this order:

1. a worker that failed by itself (an exception, a non-zero exit, or a signal the launcher did not send,
   such as the OOM killer's SIGKILL): the earliest one "failed first";
2. else, when the failures only waited for a peer (gloo/NCCL "connection closed by peer", a collective
   that timed out), a worker that had already exited early with code 0 while the others still ran;
3. else a worker that was still running when the launcher stopped it: it never reached the collective
   the others waited in, and its stack (dumped on the launcher's SIGTERM) says where it was stuck;
4. else the earliest failure, marked as waiting for a rank this machine cannot see.

When the stall watchdog ended the run (every worker exited with 124 after dumping its state), the merged
diagnosis, which names the rank that is not in the collective, is the headline.

Which workers the launcher signalled is known exactly (`agent.StopRecorder`), not guessed from the
signal. The stall watchdog's merged diagnosis (`distrib._diagnosis.merged_report`), when there is one,
is printed after the headline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import records

_PEER_ERROR = re.compile(
    r"Connection (closed|reset) by peer|remote worker (crash|hang)|Broken pipe|NCCL communicator was aborted"
    r"|DistNetworkError|Socket Timeout|Timed out waiting|Timed out after|timed out in (all|broad|barr|gath|reduc)"
)
_STOP_SIGNALS = {int(signal.SIGTERM), int(signal.SIGKILL)}
#: the exit status of a worker the stall watchdog ended (`distrib._diagnosis.STALL_EXIT_CODE`): it waited
STALL_EXIT_CODE = 124
_BOOTSTRAP_FRAME = re.compile(
    r'^  File "(<frozen runpy>|[^"]*runpy\.py|[^"]*distrib[/\\]_launch[/\\](worker|agent)\.py'
    r'|[^"]*torch[/\\]distributed[/\\]elastic[/\\]multiprocessing[/\\]errors[/\\]__init__\.py)"'
)
_STACK_LINES = 12


@dataclass(frozen=True)
class WorkerFailure:
    """One failed worker, independent of torch's classes.

    `signalled`: whether the launcher sent this worker a stop signal (None when that is unknown; then a
    SIGTERM or SIGKILL death is taken for one)."""

    rank: int
    local_rank: int
    exitcode: int
    pid: int
    timestamp: float
    message: str = ""
    traceback: str = ""
    signalled: bool | None = None

    @property
    def signal_name(self) -> str | None:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    @property
    def lost_a_peer(self) -> bool:
        """It waited for another worker (gone, too slow, or stalled): a consequence, not the cause."""
        if self.exitcode == STALL_EXIT_CODE:
            return True
        return bool(_PEER_ERROR.search(self.message) or _PEER_ERROR.search(self.traceback[-2000:]))

    @property
    def stopped_by_launcher(self) -> bool:
        if self.signalled is not None:
            return self.signalled
        return self.exitcode < 0 and -self.exitcode in _STOP_SIGNALS

    def outcome(self) -> str:
        if self.signal_name:
            return f"killed by {self.signal_name}"
        return f"exit code {self.exitcode}"

    def describe_pid(self) -> str:
        return f" (pid {self.pid})" if self.pid else ""

    def who(self, machine_rank: int, hostname: str) -> str:
        return f"rank {self.rank} (local rank {self.local_rank}) on machine {machine_rank} ({hostname})"


@dataclass(frozen=True)
class Evidence:
    """What else the launcher knows about an attempt: the workers' exit records and stack dumps, the
    stall watchdog's merged diagnosis, and where the report is written from."""

    machine_rank: int = 0
    hostname: str = "localhost"
    exits: Mapping[int, records.WorkerRecord] = field(default_factory=dict)
    stacks: Mapping[int, str] = field(default_factory=dict)
    diagnosis: str | None = None
    restarts: int = 0


def from_process_failures(
    failures: Mapping[int, Any], signalled_pids: Collection[int] | None = None
) -> list[WorkerFailure]:
    """Convert torch's failures (global rank -> ProcessFailure); `signalled_pids`: the pids the launcher
    sent a stop signal (None: unknown)."""
    out = []
    for rank, failure in failures.items():
        message, callstack = _error_data(getattr(failure, "error_file_data", None) or {})
        pid = int(failure.pid)
        out.append(
            WorkerFailure(
                rank=int(rank),
                local_rank=int(failure.local_rank),
                exitcode=int(failure.exitcode),
                pid=pid,
                timestamp=_error_time(failure),
                message=message,
                traceback=trim_traceback(callstack),
                signalled=None if signalled_pids is None else pid in signalled_pids,
            )
        )
    return out


def add_sibling_errors(found: list[WorkerFailure], failures: Mapping[int, Any]) -> list[WorkerFailure]:
    """Add workers of the same attempt that wrote an error file but are missing from `failures`.

    With a function entry point torch reports only the first failed process it noticed (the lowest local
    rank), which is not always the one that failed first; the others' error files sit next to its own
    (`<attempt dir>/<local rank>/error.json`).
    """
    if not failures:
        return found
    rank, failure = next(iter(failures.items()))
    attempt_dir = Path(str(getattr(failure, "error_file", ""))).parent.parent
    if not attempt_dir.is_dir():
        return found
    known = {f.local_rank for f in found}
    offset = int(rank) - int(failure.local_rank)
    out = list(found)
    for error_file in sorted(attempt_dir.glob("*/error.json")):
        local_rank = int(error_file.parent.name) if error_file.parent.name.isdigit() else -1
        if local_rank < 0 or local_rank in known:
            continue
        try:
            data = json.loads(error_file.read_text())
        except (OSError, ValueError):
            continue
        message, callstack = _error_data(data)
        out.append(
            WorkerFailure(
                rank=offset + local_rank,
                local_rank=local_rank,
                exitcode=1,
                pid=0,
                timestamp=error_file.stat().st_mtime,
                message=message,
                traceback=trim_traceback(callstack),
                signalled=False,
            )
        )
    return out


def _error_time(failure: Any) -> float:
    """When the worker failed: its error file's modification time (precise), else torch's whole seconds."""
    try:
        return os.path.getmtime(failure.error_file)
    except (OSError, TypeError, AttributeError):
        return float(failure.timestamp)


def _error_data(data: Mapping[str, Any]) -> tuple[str, str]:
    message = data.get("message", "")
    if isinstance(message, Mapping):
        extra = message.get("extraInfo", {}) or {}
        return str(message.get("message", "")), str(extra.get("py_callstack", ""))
    return str(message), ""


def trim_traceback(text: str) -> str:
    """Drop the frames of the worker bootstrap and runpy, so the traceback starts in the user's code."""
    lines = text.rstrip("\n").splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        if _BOOTSTRAP_FRAME.match(line):
            skipping = True
            continue
        if skipping and line.startswith("    "):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out)


def first_failure(failures: list[WorkerFailure]) -> WorkerFailure:
    """The earliest failure that is a cause: among workers that ended by themselves (not stopped by the
    launcher) and did not merely wait for a peer, the one that failed earliest; ties go to one with a
    traceback, then to the lowest rank. When every failure waited for a peer, the earliest of those."""
    return min(
        failures, key=lambda f: (f.stopped_by_launcher, f.lost_a_peer, f.timestamp, not f.traceback, f.rank)
    )


def failed_step(found: list[WorkerFailure], exits: Mapping[int, records.WorkerRecord]) -> int | None:
    """The optimizer step the attempt failed at: the first failure's, else the lowest any failing rank
    recorded (None when no `distributed()` scope recorded one)."""
    first = first_failure(found)
    record = exits.get(first.rank)
    if record is not None and record.step is not None:
        return record.step
    steps = [exits[f.rank].step for f in found if f.rank in exits and exits[f.rank].step is not None]
    return min((s for s in steps if s is not None), default=None)


def preempted(found: list[WorkerFailure], preemption_exit_code: int | None) -> bool:
    """Every worker that ended by itself left with the preemption exit code (saved, "try again")."""
    if not preemption_exit_code:  # None (not caught) or 0 (indistinguishable from success)
        return False
    own = [f for f in found if not f.stopped_by_launcher]
    return bool(own) and all(f.exitcode == preemption_exit_code for f in own)


def exit_code(failure: WorkerFailure) -> int:
    """The launcher's exit code for a failed run: the worker's code, 128 + signal, never 0."""
    if failure.exitcode > 0:
        return failure.exitcode
    if failure.exitcode < 0:
        return 128 + (-failure.exitcode)
    return 1


def format_report(failures: list[WorkerFailure], evidence: Evidence | None = None) -> str:
    """The failure report printed by `distrib launch` and raised by `notebook_launcher`."""
    evidence = evidence or Evidence()
    first = first_failure(failures)
    if stalled(failures):
        lines = _stall_headline(failures, evidence)
    else:
        lines = _headline(first, failures, evidence)
        if evidence.diagnosis:
            lines += ["Stall diagnosis (every rank's dump, merged):", evidence.diagnosis.rstrip()]
    mentioned = {first.rank, *_culprit_ranks(first, failures, evidence)}
    if stalled(failures):
        mentioned = {f.rank for f in failures if not f.stopped_by_launcher}
    for other in sorted((f for f in failures if f.rank not in mentioned), key=lambda f: f.rank):
        if other.stopped_by_launcher:
            what = "stopped by the launcher"
        elif other.lost_a_peer:
            what = "failed waiting for another rank"
        else:
            what = "failed later"
        lines.append(f"  rank {other.rank} (local rank {other.local_rank}): {what} ({other.outcome()})")
    if evidence.restarts:
        lines.append(
            f"The worker group was restarted {evidence.restarts} time(s) before this failure (--max-restarts)."
        )
    return "\n".join(lines)


def stalled(failures: list[WorkerFailure]) -> bool:
    """Every worker that ended by itself was ended by the stall watchdog (no rank made progress)."""
    own = [f for f in failures if not f.stopped_by_launcher]
    return bool(own) and all(f.exitcode == STALL_EXIT_CODE for f in own)


def _stall_headline(failures: list[WorkerFailure], evidence: Evidence) -> list[str]:
    """The merged diagnosis names the rank that is not in the collective; the launcher only adds how the
    workers ended (every one of them waited, so none "failed first")."""
    own = [str(f.rank) for f in sorted(failures, key=lambda f: f.rank) if not f.stopped_by_launcher]
    ended = (
        f"  {'ranks' if len(own) > 1 else 'rank'} {', '.join(own)} on machine {evidence.machine_rank} ({evidence.hostname}) {'were' if len(own) > 1 else 'was'} ended by the stall "
        f"watchdog (exit code {STALL_EXIT_CODE}) after dumping {'their' if len(own) > 1 else 'its'} state."
    )
    early = [
        f"  rank {r.rank} had exited early with code 0 at {time.strftime('%H:%M:%S', time.localtime(r.time))}, "
        "while the others still ran: it is the rank they waited for."
        for r in sorted(evidence.exits.values(), key=lambda r: r.rank)
        if r.exit_code == 0
    ]
    if evidence.diagnosis:
        return [evidence.diagnosis.rstrip(), *early, ended]
    return [
        "distrib: the run stalled: no rank made progress for stall_timeout seconds, and no merged diagnosis was "
        "found (the dumps of the other machines' ranks are on those machines).",
        *early,
        ended,
    ]


def _culprit_ranks(first: WorkerFailure, failures: list[WorkerFailure], evidence: Evidence) -> list[int]:
    if not first.lost_a_peer or first.stopped_by_launcher:
        return []
    early = _early_exits(first, evidence)
    if early:
        return [r.rank for r in early]
    return [f.rank for f in failures if f.stopped_by_launcher]


def _early_exits(first: WorkerFailure, evidence: Evidence) -> list[records.WorkerRecord]:
    return sorted(
        (r for r in evidence.exits.values() if r.exit_code == 0 and r.time <= first.timestamp),
        key=lambda r: r.time,
    )


def _headline(first: WorkerFailure, failures: list[WorkerFailure], evidence: Evidence) -> list[str]:
    where = evidence.machine_rank, evidence.hostname
    if not first.lost_a_peer or first.stopped_by_launcher:
        return [
            f"distrib: {first.who(*where)} failed first: {first.outcome()}{first.describe_pid()}.",
            _error_text(first),
        ]
    early = _early_exits(first, evidence)
    if early:
        ranks = ", ".join(f"rank {r.rank}" for r in early)
        at = time.strftime("%H:%M:%S", time.localtime(early[0].time))
        return [
            f"distrib: {ranks} on machine {where[0]} ({where[1]}) exited early (exit code 0, at {at}) while the "
            f"others still ran; rank {first.rank} then failed waiting for it ({first.outcome()}):",
            _error_text(first),
        ]
    stuck = sorted((f for f in failures if f.stopped_by_launcher), key=lambda f: f.rank)
    if stuck:
        return _stuck_headline(first, stuck, evidence)
    return [
        f"distrib: {first.who(*where)} failed waiting for another rank ({first.outcome()}{first.describe_pid()}); "
        "the rank it waited for is on another machine or left no trace here:",
        _error_text(first),
    ]


def _stuck_headline(first: WorkerFailure, stuck: list[WorkerFailure], evidence: Evidence) -> list[str]:
    lines = []
    for worker in stuck:
        stack = evidence.stacks.get(worker.rank, "")
        frame = records.stuck_frame(stack)
        where = f", stuck at {frame}" if frame else ""
        lines.append(
            f"distrib: {worker.who(evidence.machine_rank, evidence.hostname)} did not reach the collective the "
            f"others waited in: it was still running{where} when the launcher stopped it."
        )
        if stack:
            frames = [
                f
                for f in records.main_thread(stack)[1:]
                if "distrib/_launch/" not in f and "<frozen runpy>" not in f
            ]
            lines += ["  its stack when stopped (most recent call first):", *_indent(frames[:_STACK_LINES])]
    lines += [f"rank {first.rank} failed waiting for it ({first.outcome()}):", _error_text(first)]
    return lines


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line.strip() for line in lines if line.strip()]


def _error_text(failure: WorkerFailure) -> str:
    if failure.traceback:
        return failure.traceback
    if (
        failure.message
        and failure.message != "<NONE>"
        and not failure.message.startswith("To enable traceback")
    ):
        return failure.message
    if failure.signal_name and not failure.stopped_by_launcher:
        return (
            f"(no Python traceback: the process was killed by {failure.signal_name}, which the launcher did not "
            "send; SIGKILL is often the kernel's out-of-memory killer: see `dmesg` or the job's memory limit)"
        )
    return (
        "(no Python traceback: the process called sys.exit()/os._exit() or was killed; see its output above)"
    )
