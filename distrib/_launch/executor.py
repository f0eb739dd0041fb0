"""Run a `LaunchPlan`: torch's elastic agent (or `torch_xla.launch`) does the process work.

The elastic executor builds a `torch.distributed.launcher.api.LaunchConfig` from the plan (the same
object `torchrun` builds from its flags) and calls `elastic_launch`: rendezvous (static or c10d) on the
main process address, one agent per machine starting `processes_per_machine` workers, health checks
every `monitor_interval` seconds, stopping every worker when one fails, and restarting the group up to
`max_restarts` times. A final failure arrives as `ChildFailedError`; `failures.py` turns it into a report.

The rendezvous backends are torch's own, wrapped (`FreshWorkerStore`) so that the workers of every attempt
get a new, empty store: torch's agent keeps one store for the whole job and, since torch 2.5, `env://` no
longer gives each restart attempt a namespace of its own, so after a restart a rank could read the gloo
(or NCCL) address a rank of the failed attempt left there and fail to connect, or hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import LaunchError, missing_extra
from . import failures
from .plan import LaunchPlan

SHUTDOWN_TIMEOUT_S = 5


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


# distrib's rendezvous backend names -> torch's backend each one wraps.
WRAPPED_BACKENDS = {"distrib-static": "static", "distrib-c10d": "c10d"}


class FreshWorkerStore:
    """A torch rendezvous handler, except that the workers of every attempt get a new, empty store.

    Why: torch's elastic agent hosts one TCPStore for the whole job and tells the workers to use it
    (`TORCHELASTIC_USE_AGENT_STORE=True`); `init_process_group("env://")` then keeps its keys there with no
    per-attempt prefix (torch <= 2.4 added `/worker/attempt_N`; 2.5 removed it, expecting a new store per
    attempt that the static and the c10d handler do not create). After `--max-restarts` restarts the group,
    the keys of the failed attempt are still there, among them each rank's gloo address, and a new rank
    that reads one before its peer has overwritten it connects to a process that is gone ("Gloo
    connectFullMesh failed ... Connection refused") or, across machines, to a rank of the old attempt
    that is still alive (both hang). The agent itself keeps using torch's store.

    How: after each rendezvous, the node with rank 0 starts a TCPStore server on a free port and publishes
    the port in the rendezvous store; every node hands that address to its workers (`MASTER_PORT`). The
    previous attempt's server stops when it is replaced (this machine's workers of that attempt are gone:
    the agent stops them before it rendezvouses again). The key is scoped to the attempt: the c10d
    handler's store is already per round; the static handler's is not, so the key carries this agent's
    own attempt number, which advances in step on every machine (static rendezvous restarts only after a
    failure). So with static rendezvous on several machines, a restarted machine waits here, up to
    --rdzv-timeout, until machine 0 has restarted too.
    """

    def __init__(self, inner: Any, backend: str) -> None:
        self._inner = inner
        self._backend = backend
        self._attempt = -1
        self._server: Any = None

    def get_backend(self) -> str:
        return self._backend

    @property
    def use_agent_store(self) -> bool:
        return bool(self._inner.use_agent_store)

    def next_rendezvous(self) -> Any:
        from torch.distributed import TCPStore
        from torch.distributed.elastic.rendezvous.api import (
            RendezvousInfo,
            RendezvousStoreInfo,
            RendezvousTimeoutError,
        )

        info = self._inner.next_rendezvous()
        self._attempt += 1
        if not self._inner.use_agent_store:  # rank 0's worker hosts a new store itself on every attempt
            return info
        key = "distrib.worker_store_port" + (
            f".{self._attempt}" if self._inner.get_backend() == "static" else ""
        )
        addr = info.bootstrap_store_info.master_addr
        if info.rank == 0:
            self._server = None  # the previous attempt's server stops first
            self._server = TCPStore(addr, 0, is_master=True, wait_for_workers=False, multi_tenant=False)
            info.store.set(key, str(self._server.port))
        try:
            port = int(info.store.get(key))
        except Exception as exc:  # DistStoreError after the store's timeout (static: --rdzv-timeout)
            raise RendezvousTimeoutError(
                f"machine rank 0 did not start attempt {self._attempt} of the worker group in time (it may "
                "still be running the failed attempt, or it stopped); see its output, or raise --rdzv-timeout."
            ) from exc
        return RendezvousInfo(info.store, info.rank, info.world_size, RendezvousStoreInfo(addr, port))

    def is_closed(self) -> bool:
        return bool(self._inner.is_closed())

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return int(self._inner.num_nodes_waiting())

    def get_run_id(self) -> str:
        return str(self._inner.get_run_id())

    def shutdown(self) -> bool:
        self._server = None
        return bool(self._inner.shutdown())

    def __getattr__(self, name: str) -> Any:  # anything else a handler offers (settings, ...)
        return getattr(self._inner, name)


def _create_handler(params: Any) -> Any:
    """Rendezvous handler factory for the `WRAPPED_BACKENDS` (registered with torch's registry)."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry

    inner = rendezvous_handler_registry.create_handler(
        RendezvousParameters(
            backend=WRAPPED_BACKENDS[params.backend],
            endpoint=params.endpoint,
            run_id=params.run_id,
            min_nodes=params.min_nodes,
            max_nodes=params.max_nodes,
            local_addr=params.local_addr,
            **params.config,
        )
    )
    return FreshWorkerStore(inner, params.backend)


def register_rendezvous_backends() -> None:
    """Make the `WRAPPED_BACKENDS` known to torch (idempotent)."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    for name in WRAPPED_BACKENDS:
        rendezvous_handler_registry.register(name, _create_handler)


def launch_config(plan: LaunchPlan, *, log_dir: str, start_method: str = "spawn") -> Any:
    """The `LaunchConfig` torchrun would build for this plan, with our wrapped rendezvous backend."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    assert plan.main_process_port is not None, "resolve_port() first"
    register_rendezvous_backends()
    rdzv_configs: dict[str, Any] = {"timeout": plan.rdzv_timeout}
    if plan.rdzv_backend == "static":
        rdzv_configs["rank"] = plan.machine_rank
    else:
        rdzv_configs["is_host"] = plan.machine_rank == 0
    extra: dict[str, Any] = {}
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        extra["shutdown_timeout"] = SHUTDOWN_TIMEOUT_S
    return LaunchConfig(
        min_nodes=plan.num_machines,
        max_nodes=plan.num_machines,
        nproc_per_node=plan.processes_per_machine,
        run_id=plan.run_id,
        role="worker",
        rdzv_endpoint=f"{plan.main_process_ip}:{plan.main_process_port}",
        rdzv_backend=f"distrib-{plan.rdzv_backend}",
        rdzv_configs=rdzv_configs,
        max_restarts=plan.max_restarts,
        monitor_interval=plan.monitor_interval,
        start_method=start_method,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        **extra,
    )


class _RestartNotice(logging.Filter):
    """Turns the agent's "will restart worker group" record into one line of ours; drops the rest."""

    def __init__(self, quiet: bool) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if "will restart worker group" in str(record.msg) and "attempts left" in str(record.msg):
            if not self.quiet:
                print(
                    "distrib: the worker group failed; restarting it (--max-restarts)",
                    file=sys.stderr,
                    flush=True,
                )
            return False
        return record.levelno >= logging.CRITICAL


def quiet_torch_logs(*, quiet: bool) -> None:
    """Silence torch's elastic loggers (each sets its own level), since failures get our own report;
    keep a one-line notice when the agent restarts the worker group."""
    manager = logging.Logger.manager
    for name in list(manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    agent = logging.getLogger("torch.distributed.elastic.agent.server.api")
    agent.setLevel(logging.INFO)
    for old in [f for f in agent.filters if isinstance(f, _RestartNotice)]:
        agent.removeFilter(old)
    agent.addFilter(_RestartNotice(quiet))


def run_elastic(
    plan: LaunchPlan,
    entrypoint: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
    *,
    start_method: str = "spawn",
    quiet: bool = False,
) -> dict[int, Any]:
    """Start the workers of this machine and wait for them; return each local worker's return value.

    `entrypoint=None` runs the plan's target through the worker bootstrap in a fresh interpreter;
    a function runs in `start_method` processes. Raises `LaunchError` with the failure report.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    plan = resolve_port(plan)
    with tempfile.TemporaryDirectory(prefix="distrib-") as log_dir, worker_environment(plan.env):
        config = launch_config(plan, log_dir=log_dir, start_method=start_method)
        quiet_torch_logs(quiet=quiet)
        try:
            if entrypoint is None:
                return elastic_launch(config, sys.executable)(*plan.worker_args())  # type: ignore[no-any-return]
            return elastic_launch(config, entrypoint)(*args)  # type: ignore[no-any-return]
        except ChildFailedError as exc:
            found = failures.add_sibling_errors(failures.from_process_failures(exc.failures), exc.failures)
            report = failures.format_report(
                found,
                machine_rank=plan.machine_rank,
                hostname=socket.gethostname(),
                restarts=plan.max_restarts,
            )
            raise WorkersFailed(report, failures.exit_code(failures.first_failure(found))) from None


class WorkersFailed(LaunchError):
    """A worker failed; the message is the report and `exit_code` what the launcher should return."""

    def __init__(self, report: str, exit_code: int) -> None:
        super().__init__(report)
        self.exit_code = exit_code


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
