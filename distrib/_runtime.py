"""The runtime: a frozen record of where this process runs, on a thread-local stack.

`distributed(...)` pushes a `Runtime`; the free functions read the top of the stack with `current()`.
Everything that changes during training (the accumulation window, the prepared objects) lives in the one
explicitly mutable `TrainingState` that the runtime points to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ._settings import Settings
from .errors import NoScopeError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from ._precision import PrecisionPlan
    from .parallel import ParallelState
    from .strategies import Strategy

F = TypeVar("F", bound=Callable[[], Any])


@dataclass(eq=False)
class TrainingState:
    """The mutable part of a run: accumulation window, step counters and prepared objects."""

    sync_gradients: bool = True
    micro_step: int = 0  # micro-batches seen in the current accumulation window
    window_size: int = 1  # micro-batches in the current window (shorter at the end of a dataloader)
    optimizer_steps: int = 0
    optimizer_step_skipped: bool = False
    # [data] set when load_state resumed on another number of processes and kept the global batch by
    # changing the accumulation steps (distrib/_data/resume.py); None: the gradient_accumulation_steps setting
    gradient_accumulation_steps: int | None = None
    active_dataloader: Any = None
    models: list[Any] = field(default_factory=list)
    optimizers: list[Any] = field(default_factory=list)
    schedulers: list[Any] = field(default_factory=list)
    dataloaders: list[Any] = field(default_factory=list)
    scaler: Any = None
    # for the first-step checks (`_guards.py`): parameters strategies replaced, and whether backward() ran
    retired_params: dict[int, Any] = field(default_factory=dict)
    used_backward: bool = False
    in_accumulate: bool = False  # inside a `with accumulate(...)` block (save_state refuses to run there)
    closing_backwards: int = 0  # backward() calls that closed a window (the replica check's clock)
    # after load_state: the optimizer step resumed from, and what to tell (trackers rewind their records)
    resumed_step: int | None = None
    resume_listeners: list[Callable[[], Any]] = field(default_factory=list)
    custom_objects: list[Any] = field(default_factory=list)
    save_hooks: list[Any] = field(default_factory=list)
    load_hooks: list[Any] = field(default_factory=list)
    strategy_state: Any = None
    # per-run state of optional features (trackers, ...), and what to finish when the scope closes
    # (`Runtime.call_on_close`; run last registered first, every one even when another raises)
    extensions: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], Any]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class Runtime:
    """Read-only view of the current run. Example::

    with distributed() as ctx:
        print(ctx.rank, ctx.world_size, ctx.device, ctx.is_main_process)
    """

    settings: Settings
    strategy_module: Strategy
    precision: PrecisionPlan
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    device: torch.device
    launcher: str
    #: where the tensors of collectives live (the CPU for gloo, the device for NCCL and XLA)
    collective_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    state: TrainingState = field(default_factory=TrainingState)
    owns_process_group: bool = False
    #: which attempt of the job this is: 0 first, then one more per restart (`--max-restarts`, elastic)
    restart_count: int = 0
    #: the N-D parallelism mesh and this rank's place in it (`parallelism` setting), else None
    parallel: ParallelState | None = None

    @property
    def strategy(self) -> str:
        """The resolved strategy name ("single", "ddp", "fsdp", "deepspeed" or "xla")."""
        return str(self.strategy_module.NAME)

    @property
    def mixed_precision(self) -> str:
        return self.settings.mixed_precision

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: the setting, unless a resume on another number of processes
        changed it to keep the global batch (see the checkpointing guide)."""
        return self.state.gradient_accumulation_steps or self.settings.gradient_accumulation_steps

    @property
    def sync_gradients(self) -> bool:
        """False inside `accumulate()` on a micro-step whose gradients are only accumulated."""
        return self.state.sync_gradients

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_rank == 0

    @property
    def is_last_process(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def optimizer_steps(self) -> int:
        """Real optimizer steps taken so far (restored by `load_state`; accumulation micro-steps and fp16
        steps skipped for inf/NaN gradients do not count)."""
        return self.state.optimizer_steps

    # -- N-D parallelism (distrib/parallel): each dimension's rank and size, 0 and 1 without a mesh -------
    @property
    def mesh(self) -> DeviceMesh | None:
        """The run's named `DeviceMesh` ("pp", "dp_replicate", "dp_shard", "cp", "tp"), or None when the
        `parallelism` setting is not used. Example: `tp_group = ctx.mesh["tp"].get_group()`."""
        return self.parallel.mesh if self.parallel is not None else None

    def _dim(self, name: str) -> tuple[int, int]:
        if self.parallel is None:
            whole = name in ("dp", "dp_shard")  # without a mesh, every rank is one data-parallel replica
            return (self.rank, self.world_size) if whole else (0, 1)
        return self.parallel.rank(name), self.parallel.size(name)

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (those that get different batches)."""
        return self._dim("dp")[0]

    @property
    def dp_world_size(self) -> int:
        """How many ranks get different batches (`dp_replicate * dp_shard`); `world_size` without a mesh."""
        return self._dim("dp")[1]

    dp_size = dp_world_size

    @property
    def dp_replicate_rank(self) -> int:
        return self._dim("dp_replicate")[0]

    @property
    def dp_replicate_size(self) -> int:
        return self._dim("dp_replicate")[1]

    @property
    def dp_shard_rank(self) -> int:
        return self._dim("dp_shard")[0]

    @property
    def dp_shard_size(self) -> int:
        return self._dim("dp_shard")[1]

    @property
    def tp_rank(self) -> int:
        return self._dim("tp")[0]

    @property
    def tp_size(self) -> int:
        return self._dim("tp")[1]

    @property
    def cp_rank(self) -> int:
        return self._dim("cp")[0]

    @property
    def cp_size(self) -> int:
        return self._dim("cp")[1]

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage (0 first)."""
        return self._dim("pp")[0]

    @property
    def pp_size(self) -> int:
        return self._dim("pp")[1]

    def call_on_close(self, fn: F) -> F:
        """Run `fn()` when the scope closes, before the process group is torn down; returns `fn`, so it
        also works as a decorator. Closers run last registered first, and every one runs even when another
        raises (the first error is raised afterwards). Example::

            with distributed() as ctx:
                log = open("log.txt", "a")
                ctx.call_on_close(log.close)
        """
        self.state.closers.append(fn)
        return fn

    def __repr__(self) -> str:
        return (
            f"Runtime(strategy={self.strategy!r}, rank={self.rank}, local_rank={self.local_rank}, "
            f"world_size={self.world_size}, device={str(self.device)!r}, "
            f"mixed_precision={self.mixed_precision!r})"
        )


_local = threading.local()


def _stack() -> list[Runtime]:
    stack: list[Runtime] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def push(runtime: Runtime) -> None:
    _stack().append(runtime)


def pop(runtime: Runtime) -> None:
    stack = _stack()
    assert stack and stack[-1] is runtime, "distributed scopes must close in the reverse order of opening"
    stack.pop()


def depth() -> int:
    """How many scopes are open in this thread."""
    return len(_stack())


def current(caller: str | None = None) -> Runtime:
    """The runtime of the innermost open scope in this thread.

    Raises `NoScopeError`, which says how to open a scope, when none is open. Example::

        with distributed():
            print(current().world_size)
    """
    stack = _stack()
    if stack:
        return stack[-1]
    what = f"{caller}() needs" if caller else "this needs"
    raise NoScopeError(
        f"{what} a distrib runtime, but no scope is open in this thread. Wrap your training code in "
        "`with distrib.distributed(...) as ctx:` or decorate your entry point with "
        "`@distrib.distributed_main`. (Scopes are per thread: a new thread must open its own.)"
    )


def current_or_none() -> Runtime | None:
    stack = _stack()
    return stack[-1] if stack else None
