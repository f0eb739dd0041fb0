"""Run this machine's workers under torch's elastic agent, with what distrib adds to it.

`run_agent` does what `torch.distributed.launcher.api.launch_agent` (the engine of `torchrun`) does (a
`WorkerSpec`, a rendezvous handler, a `LocalElasticAgent`, its `run()`), with an agent subclass that:

* gives every attempt of the worker group its own diagnostics directory (`DISTRIB_DIAGNOSTICS_DIR`);
* records which workers the launcher itself signalled (`StopRecorder`), so a worker killed by someone
  else (the OOM killer) is reported as the cause, not as "stopped by the launcher";
* after a failure, stops restarting when the attempt failed at the same optimizer step as the attempt
  before (a crash loop), or when the workers left with the preemption exit code (they saved; the machine
  is going away): neither is what `--max-restarts` is for;
* when a worker leaves with the preemption exit code (or the stall watchdog's), gives the others up to
  the grace period to finish saving (or dumping their state) and leave by themselves before stopping them;
* forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 (SLURM's `--signal`) sent to the launcher to the
  workers, and kills them after the grace period (torch's `shutdown_timeout`).

This module imports torch's elastic agent; the executor imports it only when workers are started.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from . import failures, records
from .plan import LaunchPlan, grace_seconds
from .rendezvous import register_rendezvous_backends

#: signals the launcher forwards to its workers (torch's default set, plus SLURM's usual SIGUSR1)
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
#: seconds stopped workers get after another worker failed (they are not saving anything)
STOP_TIMEOUT_S = 5

_ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
_AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"
_PROCESS_LOGGER = "torch.distributed.elastic.multiprocessing.api"
# the messages torch's process contexts log, with the pid first, right before they signal a worker
_SIGNAL_MESSAGES = ("closing signal", "Closing process", "forcefully exiting")


class StopRecorder(logging.Filter):
    """Collects the pids torch's process context signals when it stops workers (from the warning it logs
    just before each signal), and drops torch's other records: failures get distrib's own report."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if any(m in message for m in _SIGNAL_MESSAGES) and record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            if str(args[0]).isdigit():
                self.pids.add(int(str(args[0])))
        return record.levelno >= logging.CRITICAL


class _RestartNotice(logging.Filter):
    """Turns the agent's "will restart worker group" record into one line of ours; drops the rest."""

    def __init__(self, quiet: bool) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "will restart worker group" in message and not self.quiet:
            why = "a machine joined or left" if "new nodes" in message else "the worker group failed"
            print(f"distrib: {why}; restarting the worker group", file=sys.stderr, flush=True)
        return record.levelno >= logging.CRITICAL


@contextmanager
def quiet_torch_logs(*, quiet: bool) -> Iterator[StopRecorder]:
    """Silence torch's elastic loggers for the run (each sets its own level; failures get our own report),
    keep a one-line notice when the agent restarts the worker group, record the workers the launcher
    signals, and restore every logger afterwards."""
    manager = logging.Logger.manager
    names = [n for n in list(manager.loggerDict) if n.startswith(_ELASTIC_LOGGERS)] + [
        _AGENT_LOGGER,
        _PROCESS_LOGGER,
    ]
    saved = {name: logging.getLogger(name).level for name in names}
    recorder, notice = StopRecorder(), _RestartNotice(quiet)
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger(_AGENT_LOGGER).setLevel(logging.INFO)
    logging.getLogger(_AGENT_LOGGER).addFilter(notice)
    logging.getLogger(_PROCESS_LOGGER).setLevel(logging.WARNING)
    logging.getLogger(_PROCESS_LOGGER).addFilter(recorder)
    try:
        yield recorder
    finally:
        logging.getLogger(_AGENT_LOGGER).removeFilter(notice)
        logging.getLogger(_PROCESS_LOGGER).removeFilter(recorder)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@dataclass(frozen=True)
class FailedAttempt:
    """One attempt of the worker group that failed: its number, diagnostics directory, failures and step."""

    attempt: int
    directory: Path
    failures: list[failures.WorkerFailure]
    step: int | None


class DistribAgent(LocalElasticAgent):  # type: ignore[misc]
    """torch's local agent plus per-attempt directories, crash-loop and preemption handling."""

    def __init__(self, *args: Any, plan: LaunchPlan, root: Path, recorder: StopRecorder, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.plan, self.root, self.recorder = plan, root, recorder
        self.rdzv_handler = kwargs["spec"].rdzv_handler
        self.attempt = -1
        self.directory: Path | None = None
        self.failed: list[FailedAttempt] = []
        self.crash_loop: FailedAttempt | None = None
        self.preempted = False
        self.exit_codes: dict[int, int | None] = {}
        self._preempted_since: float | None = None

    def _start_workers(self, worker_group: Any) -> Any:
        self.attempt += 1
        self.directory = self.root / f"attempt-{self.attempt}"
        self.directory.mkdir(parents=True, exist_ok=True)
        os.environ[records.DIAGNOSTICS_VARIABLE] = str(self.directory)
        self._preempted_since = None
        return super()._start_workers(worker_group)

    def _stop_workers(self, worker_group: Any) -> None:
        self._shutdown(timeout=STOP_TIMEOUT_S)

    def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
        super()._shutdown(death_sig, timeout)
        self.exit_codes = exit_codes(self._pcontext) or self.exit_codes

    def _monitor_workers(self, worker_group: Any) -> Any:
        if finishing_a_save(self._pcontext, self.plan, self):
            return RunResult(state=WorkerState.HEALTHY)
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED:
            self._judge(result.failures)
        return result

    def _judge(self, torch_failures: Any) -> None:
        """Record the failed attempt; stop the restarts after a preemption or a crash loop."""
        found = failures.add_sibling_errors(
            failures.from_process_failures(torch_failures, self.recorder.pids), torch_failures
        )
        exits = records.read_records(self.directory)
        step = failures.failed_step(found, exits)
        attempt = FailedAttempt(self.attempt, self.directory or self.root, found, step)
        if failures.preempted(found, self.plan.preemption_exit_code):
            self.preempted = True
            self._remaining_restarts = 0
        elif (
            self._remaining_restarts > 0 and step is not None and self.failed and self.failed[-1].step == step
        ):
            self.crash_loop = attempt
            self._remaining_restarts = 0
        self.failed.append(attempt)


def finishing_a_save(pcontext: Any, plan: LaunchPlan, state: Any) -> bool:
    """A worker left with the preemption code (it saved) or the stall code (it dumped its state) while
    others still run: give them the grace period to finish the same checkpoint or dump and leave by
    themselves before the agent stops them (`state._preempted_since` remembers when the first one left)."""
    codes = exit_codes(pcontext)
    together = {failures.STALL_EXIT_CODE}
    if plan.preemption_exit_code is not None:
        together.add(plan.preemption_exit_code)
    running = [c for c in codes.values() if c is None]
    if (
        not running
        or not together & set(codes.values())
        or any(c not in (None, 0, *together) for c in codes.values())
    ):
        return False
    now = time.monotonic()
    state._preempted_since = state._preempted_since or now
    return bool(now - state._preempted_since < plan.grace_period)


def exit_codes(pcontext: Any) -> dict[int, int | None]:
    """Each local worker's exit code (None: still running) from torch's process context, or {} when this
    version of torch keeps them elsewhere."""
    handlers = getattr(pcontext, "subprocess_handlers", None)
    if handlers:
        return {int(local_rank): handler.proc.poll() for local_rank, handler in handlers.items()}
    processes = getattr(getattr(pcontext, "_pc", None), "processes", None)
    if processes:
        return {i: p.exitcode for i, p in enumerate(processes)}
    return {}


def make_agent(
    plan: LaunchPlan,
    entrypoint: Callable[..., Any] | str,
    args: tuple[Any, ...],
    *,
    root: Path,
    log_dir: str,
    start_method: str,
    recorder: StopRecorder,
) -> Any:
    """The agent for this plan: rendezvous (distrib's wrapped backends), worker spec and timeouts."""
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    assert plan.main_process_port is not None, "resolve the port first"
    register_rendezvous_backends()
    low, high = plan.machine_count
    config: dict[str, Any] = {"timeout": plan.rdzv_timeout}
    if plan.rdzv_backend == "static":
        config["rank"] = plan.machine_rank
    else:
        config.update(is_host=plan.machine_rank == 0, join_timeout=plan.rdzv_timeout)
    config.update(dict(plan.rdzv_conf))
    handler = rdzv_registry.get_rendezvous_handler(
        RendezvousParameters(
            backend=f"distrib-{plan.rdzv_backend}",
            endpoint=f"{plan.main_process_ip}:{plan.main_process_port}",
            run_id=plan.run_id,
            min_nodes=low,
            max_nodes=high,
            **config,
        )
    )
    spec = WorkerSpec(
        role="worker",
        local_world_size=plan.processes_per_machine,
        entrypoint=entrypoint,
        args=tuple(args),
        rdzv_handler=handler,
        max_restarts=plan.max_restarts,
        monitor_interval=plan.monitor_interval,
    )
    return DistribAgent(
        spec=spec,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        start_method=start_method,
        shutdown_timeout=grace_seconds(plan),
        plan=plan,
        root=root,
        recorder=recorder,
    )


@contextmanager
def forwarded_signals() -> Iterator[None]:
    """Have torch's agent forward `FORWARDED_SIGNALS` to the workers, and give the caller its own signal
    handlers back afterwards (torch installs its handlers when workers start and never removes them)."""
    names = [n for n in FORWARDED_SIGNALS if hasattr(signal, n)]
    saved = {name: signal.getsignal(getattr(signal, name)) for name in names}
    previous = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(names)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():  # torch installs them only there
            for name, handler in saved.items():
                if handler is not None:
                    signal.signal(getattr(signal, name), handler)
        if previous is None:
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        else:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = previous
