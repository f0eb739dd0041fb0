"""Turn the elastic agent's failure records into one readable report.

torch's agent raises `ChildFailedError` whose `failures` map each failed global rank to a
`ProcessFailure` (exit code, pid, and the error file the worker bootstrap wrote with its traceback).
When one worker fails the agent stops the others, which then appear as failures too (SIGTERM); the
report puts the worker that really failed first (see `first_failure`).
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PEER_ERROR = re.compile(
    r"Connection (closed|reset) by peer|remote worker (crash|hang)|Broken pipe|NCCL communicator was aborted"
    r"|DistNetworkError|Socket Timeout"
)
_STOP_SIGNALS = {int(signal.SIGTERM), int(signal.SIGKILL)}
_BOOTSTRAP_FRAME = re.compile(
    r'^  File "(<frozen runpy>|[^"]*runpy\.py|[^"]*distrib[/\\]_launch[/\\]worker\.py'
    r'|[^"]*torch[/\\]distributed[/\\]elastic[/\\]multiprocessing[/\\]errors[/\\]__init__\.py)"'
)


@dataclass(frozen=True)
class WorkerFailure:
    """One failed worker, independent of torch's classes."""

    rank: int
    local_rank: int
    exitcode: int
    pid: int
    timestamp: float
    message: str = ""
    traceback: str = ""

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
        """The error says another worker went away first (a consequence, not the cause)."""
        return bool(_PEER_ERROR.search(self.message) or _PEER_ERROR.search(self.traceback[-2000:]))

    @property
    def stopped_by_launcher(self) -> bool:
        return self.exitcode < 0 and -self.exitcode in _STOP_SIGNALS

    def outcome(self) -> str:
        if self.signal_name:
            return f"killed by {self.signal_name}"
        return f"exit code {self.exitcode}"

    def describe_pid(self) -> str:
        return f" (pid {self.pid})" if self.pid else ""


def from_process_failures(failures: Mapping[int, Any]) -> list[WorkerFailure]:
    """Convert torch's `ChildFailedError.failures` (rank -> ProcessFailure)."""
    out = []
    for rank, failure in failures.items():
        message, callstack = _error_data(getattr(failure, "error_file_data", None) or {})
        out.append(
            WorkerFailure(
                rank=int(rank),
                local_rank=int(failure.local_rank),
                exitcode=int(failure.exitcode),
                pid=int(failure.pid),
                timestamp=_error_time(failure),
                message=message,
                traceback=trim_traceback(callstack),
            )
        )
    return out


def add_sibling_errors(found: list[WorkerFailure], failures: Mapping[int, Any]) -> list[WorkerFailure]:
    """Add workers of the same attempt that wrote an error file but are missing from `failures`.

    With a function entry point torch reports only the first failed process it noticed (the lowest local
    rank), which is not always the one that failed first; the others' error files sit next to its own
    (`<attempt dir>/<local rank>/error.json`).
    """
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
    """The root cause: among workers that ended by themselves (not stopped by the launcher's SIGTERM or
    SIGKILL) and did not merely lose a peer (gloo/NCCL "connection closed by peer"), the one that failed
    earliest; ties go to one with a traceback, then to the lowest rank."""
    return min(
        failures, key=lambda f: (f.stopped_by_launcher, f.lost_a_peer, f.timestamp, not f.traceback, f.rank)
    )


def exit_code(failure: WorkerFailure) -> int:
    """The launcher's exit code for a failed run: the worker's code, 128 + signal, never 0."""
    if failure.exitcode > 0:
        return failure.exitcode
    if failure.exitcode < 0:
        return 128 + (-failure.exitcode)
    return 1


def format_report(
    failures: list[WorkerFailure], *, machine_rank: int, hostname: str, restarts: int = 0
) -> str:
    """The failure report printed by `distrib launch` and raised by `notebook_launcher`."""
    first = first_failure(failures)
    lines = [
        f"distrib: rank {first.rank} (local rank {first.local_rank}) on machine {machine_rank} ({hostname}) "
        f"failed first: {first.outcome()}{first.describe_pid()}.",
    ]
    if first.traceback:
        lines += [first.traceback]
    elif first.message and first.message != "<NONE>" and not first.message.startswith("To enable traceback"):
        lines += [first.message]
    else:
        lines += [
            "(no Python traceback: the process called sys.exit()/os._exit() or was killed; see its output above)"
        ]
    others = sorted((f for f in failures if f is not first), key=lambda f: f.rank)
    for other in others:
        what = "stopped by the launcher" if other.stopped_by_launcher else "failed later"
        lines.append(f"  rank {other.rank} (local rank {other.local_rank}): {what} ({other.outcome()})")
    if restarts:
        lines.append(
            f"The worker group was restarted {restarts} time(s) before this failure (--max-restarts)."
        )
    return "\n".join(lines)
