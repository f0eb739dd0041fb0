"""Run a `LaunchPlan`: torch's elastic agent (or `torch_xla.launch`) does the process work.

The elastic executor hands the plan to torch's `LocalElasticAgent` (`agent.py`, as `torchrun` does):
rendezvous (static or c10d) on the main process address, one agent per machine starting
`processes_per_machine` workers, health checks every `monitor_interval` seconds, stopping every worker
when one fails, and restarting the group up to `max_restarts` times (or at a new size, when an elastic
run's membership changes). Each worker gets `DISTRIB_DIAGNOSTICS_DIR` (one directory per attempt, kept
after a failure), `DISTRIB_LAUNCHER_PID` and `DISTRIB_GRACE_PERIOD` (`records.py`). A final failure becomes
one report (`failures.py`), the stall watchdog's merged diagnosis included when there is one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import LaunchError, missing_extra
from . import failures, records, worker
from .plan import LaunchPlan


def free_port() -> int:
    """A TCP port that was free on every interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """True when another process listens on (or holds) `port` on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


@contextlib.contextmanager
def worker_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Export `env` to the processes started inside the block, then restore the caller's environment
    exactly (torch's `launch_agent` adds variables of its own, e.g. TORCHELASTIC_SIGNALS_TO_HANDLE)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def resolve_port(plan: LaunchPlan) -> LaunchPlan:
    """The plan with its rendezvous port fixed (a free one when the plan left it open)."""
    if plan.main_process_port is not None:
        return plan
    return dataclasses.replace(plan, main_process_port=free_port())


def run_elastic(
    plan: LaunchPlan,
    entrypoint: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
    *,
    start_method: str = "spawn",
    quiet: bool = False,
) -> dict[int, Any]:
    """Start the workers of this machine and wait for them; return each local worker's return value.

    `entrypoint=None` runs the plan's target through the worker bootstrap in a fresh interpreter; a
    function runs in `start_method` processes. Raises `WorkersFailed` with the failure report (or
    `WorkersPreempted` when the workers saved and left with the preemption exit code).
    """
    from . import agent as agent_module  # imports torch's elastic agent

    plan = resolve_port(plan)
    root = Path(tempfile.mkdtemp(prefix="distrib-diagnostics-"))
    env = {
        **plan.env,
        records.DIAGNOSTICS_VARIABLE: str(root),
        records.LAUNCHER_PID_VARIABLE: str(os.getpid()),
        records.GRACE_VARIABLE: f"{plan.grace_period:g}",
    }
    if plan.rdzv_backend == "c10d":
        # torch 2.13's c10d rendezvous shares its TCPStore with the workers by default, and then a machine
        # that joins a running group waits forever for an address the old rank 0 never publishes again
        # (its shared server already exists); without sharing, every round publishes a fresh one
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    target: Callable[..., Any] | str = sys.executable
    worker_args: tuple[Any, ...] = plan.worker_args()
    if entrypoint is not None:
        target, worker_args = worker.run_function, (entrypoint, *args)
    with (
        tempfile.TemporaryDirectory(prefix="distrib-logs-") as log_dir,
        worker_environment(env),
        agent_module.quiet_torch_logs(quiet=quiet) as recorder,
        agent_module.forwarded_signals(),
    ):
        agent = agent_module.make_agent(
            plan,
            target,
            worker_args,
            root=root,
            log_dir=log_dir,
            start_method=start_method,
            recorder=recorder,
        )
        values = _run(plan, agent)
    shutil.rmtree(root, ignore_errors=True)
    return values


def _run(plan: LaunchPlan, agent: Any) -> dict[int, Any]:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    stopped_by_signal = False
    try:
        result = agent.run()
    except SignalException as exc:
        stopped_by_signal = True
        raise _stopped(plan, agent, exc.sigval) from None
    finally:
        if not stopped_by_signal:  # as torchrun: a signalled agent leaves the rendezvous open for the others
            agent.rdzv_handler.shutdown()
    if result.is_failed():
        raise _failed(plan, agent)
    return dict(result.return_values)


def _failed(plan: LaunchPlan, agent: Any) -> WorkersFailed:
    """The report of the attempt that failed last (with crash-loop and preemption verdicts)."""
    last = agent.failed[-1]
    found = last.failures
    if agent.preempted and plan.preemption_exit_code is not None:
        return WorkersPreempted(
            f"distrib: preempted: the workers saved and exited with code {plan.preemption_exit_code} "
            "(preemption_exit_code) after a SIGTERM/SIGUSR1 reached them. Run the same command again to "
            "resume from the checkpoint they saved.",
            plan.preemption_exit_code,
        )
    evidence = failures.Evidence(
        machine_rank=plan.machine_rank,
        hostname=socket.gethostname(),
        exits=records.read_records(last.directory),
        stacks={f.rank: records.read_stack(last.directory, f.rank) for f in found if f.stopped_by_launcher},
        diagnosis=merged_diagnosis(last.directory),
        restarts=max(0, agent.attempt),
    )
    report = failures.format_report(found, evidence)
    if agent.crash_loop is not None:
        report = _crash_loop_summary(plan, agent) + "\n" + report
    report += f"\nDiagnostics of this run are kept in {agent.root}."
    return WorkersFailed(report, failures.exit_code(failures.first_failure(found)))


def _crash_loop_summary(plan: LaunchPlan, agent: Any) -> str:
    loop = agent.crash_loop
    previous = agent.failed[-2]
    left = plan.max_restarts - max(0, agent.attempt)
    return (
        f"distrib: crash loop at step {loop.step}: attempt {loop.attempt} failed at optimizer step {loop.step} "
        f"again, as attempt {previous.attempt} did, so the launcher stopped instead of using the "
        f"{left} remaining restart(s) of --max-restarts {plan.max_restarts}. Fix the failure below (or the "
        "checkpoint the runs resume from) and launch again."
    )


def _stopped(plan: LaunchPlan, agent: Any, sigval: Any) -> WorkersFailed:
    """The launcher got a signal, forwarded it, and waited up to the grace period for the workers."""
    name = getattr(sigval, "name", str(sigval))
    number = int(getattr(sigval, "value", 15))
    codes = dict(agent.exit_codes)
    for rank, record in records.read_records(agent.directory).items():
        codes.setdefault(rank % max(1, plan.processes_per_machine), record.exit_code)
    code = plan.preemption_exit_code
    if code is not None and codes and all(c == code for c in codes.values()):
        return WorkersPreempted(
            f"distrib: received {name} and forwarded it to the workers, which saved and exited with code "
            f"{code} (preempted). Run the same command again to resume from their checkpoint.",
            code,
        )
    states = ", ".join(f"local rank {r}: {_ending(c, number)}" for r, c in sorted(codes.items()))
    return WorkersFailed(
        f"distrib: received {name}; forwarded it to the workers and stopped them (grace period "
        f"{plan.grace_period:g} s{'; ' + states if states else ''}).",
        128 + number,
    )


def _ending(code: int | None, forwarded: int) -> str:
    if code is None:
        return "still running after the grace period"
    if code == -forwarded:
        return "ended by the forwarded signal"
    if code < 0:
        return "killed after the grace period" if code == -9 else f"killed by signal {-code}"
    return f"exit code {code}"


def merged_diagnosis(directory: Path | None) -> str | None:
    """The stall watchdog's merged diagnosis of one attempt (`distrib._diagnosis.merged_report`), or None
    when that module is not installed or found nothing."""
    if directory is None:
        return None
    try:
        from .._diagnosis import merged_report  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        return merged_report(directory)  # type: ignore[no-any-return]
    except Exception as exc:  # a diagnosis must never hide the failure it diagnoses
        return f"(the per-rank dumps in {directory} could not be merged: {type(exc).__name__}: {exc})"


class WorkersFailed(LaunchError):
    """A worker failed; the message is the report and `exit_code` what the launcher should return."""

    def __init__(self, report: str, exit_code: int) -> None:
        super().__init__(report)
        self.exit_code = exit_code


class WorkersPreempted(WorkersFailed):
    """The workers saved and left with the preemption exit code: "try again" (`exit_code` is that code)."""


def run_xla(plan: LaunchPlan) -> None:
    """Start one process per local XLA device with `torch_xla.launch`, each running the target."""
    try:
        import torch_xla
    except ImportError:
        raise missing_extra("torch_xla", "xla", "strategy 'xla'") from None
    with worker_environment(plan.env):
        try:
            torch_xla.launch(
                _xla_worker,
                args=(plan.target.name, plan.target.args, plan.target.kind == "module"),
                debug_single_process=plan.processes_per_machine == 1,
            )
        except Exception as exc:  # xmp.spawn re-raises a child's exception with its traceback as text
            report = (
                f"distrib: an XLA worker on machine {plan.machine_rank} ({socket.gethostname()}) failed:\n"
            )
            raise WorkersFailed(report + "".join(traceback.format_exception_only(exc)).rstrip(), 1) from None


def _xla_worker(index: int, target: str, args: tuple[str, ...], is_module: bool) -> None:
    """Entry point of one XLA process (module level, so `spawn` can pickle it).

    torch_xla's spawner sets no torch.distributed variables; the runtime reads where this process sits
    from RANK/WORLD_SIZE/LOCAL_RANK like for any launcher, so export them from the PJRT runtime first.
    """
    import torch_xla.runtime as xr

    from . import worker

    os.environ.update(
        {
            "RANK": str(xr.global_ordinal()),
            "WORLD_SIZE": str(xr.world_size()),
            "LOCAL_RANK": str(xr.local_ordinal()),
            "LOCAL_WORLD_SIZE": str(xr.local_device_count()),
        }
    )

    worker.run(target, list(args), is_module=is_module)
