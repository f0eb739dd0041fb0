"""`distributed(...)` and `@distributed_main`: open a scope, install the runtime, tear it down."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, overload

import torch
import torch.distributed as dist

from . import _codec, _preemption, _runtime, _scope_checks, parallel, strategies
from ._environment import read_environment, resolve_settings
from ._runtime import Runtime, TrainingState
from ._settings import Settings
from .errors import DistribWarning, SettingsError

F = TypeVar("F", bound=Callable[..., Any])


class distributed:
    """Open a distrib scope: detect the launch, pick the device and strategy, create the process group.

    Settings come as keywords (see `Settings`) or as one `Settings` object. The scope that created the
    process group destroys it on exit; a scope nested in another reuses the outer group. Scopes are per
    thread. On exit, in this order: the functions given to `ctx.call_on_close` (last first), the strategy's
    teardown, the process group (after a barrier when the block ended without an error). Every step runs
    even when an earlier one raised, and a failure while the scope opens undoes what was already set up.
    Example::

        with distributed(mixed_precision="bf16", gradient_accumulation_steps=4) as ctx:
            model, optimizer, loader = prepare(model, optimizer, loader)
            ...
    """

    def __init__(self, settings: Settings | None = None, /, **kwargs: Any) -> None:
        if settings is not None and kwargs:
            raise SettingsError(
                "pass either a Settings object or keyword settings to distributed(), not both."
            )
        if settings is not None and not isinstance(settings, Settings):
            raise SettingsError(
                f"distributed() takes a Settings object or keywords, got {type(settings).__name__}; "
                "write distributed(mixed_precision='bf16', ...) or distributed(Settings(...))."
            )
        self._code_values = _explicit_values(settings) if settings is not None else dict(kwargs)
        Settings.from_mapping(self._code_values)  # validate early, at the call site
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Runtime:
        if self._stack is not None:
            raise SettingsError("this distributed(...) scope is already open; create a new one to re-enter.")
        with contextlib.ExitStack() as stack:  # undoes what was set up when a later step fails
            runtime = self._open(stack)
            self._stack = stack.pop_all()
        return runtime

    def _open(self, stack: contextlib.ExitStack) -> Runtime:
        """Set the run up step by step, registering each step's undo on `stack` as soon as it is done."""
        env = read_environment()
        settings, conflicts = resolve_settings(self._code_values, env)
        if conflicts and env.rank == 0:
            for message in conflicts:
                warnings.warn(message, DistribWarning, stacklevel=4)
        strategy = strategies.resolve(settings, env)
        device = strategy.choose_device(env, settings)
        plan = strategy.precision_plan(settings, device)
        dims = parallel.plan(settings, env.world_size, device, strategy.NAME, rank=env.rank)  # N-D sizes
        owns_group = strategy.init_process_group(env, settings, device)
        if owns_group:
            stack.push(_close_group)
        mesh = parallel.build(dims, settings, device)  # the one DeviceMesh, on the process group
        runtime = Runtime(
            settings=settings,
            strategy_module=strategy,
            precision=plan,
            rank=env.rank,
            local_rank=env.local_rank,
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            node_rank=env.node_rank,
            num_nodes=env.num_nodes,
            device=device,
            launcher=env.launcher,
            collective_device=strategy.collective_device(device),
            state=TrainingState(),
            owns_process_group=owns_group,
            restart_count=env.restart_count,
            parallel=mesh,
        )
        runtime.state.strategy_state = strategy.setup(runtime)
        stack.callback(strategy.teardown, runtime)
        runtime.state.scaler = plan.make_scaler() if plan.make_scaler is not None else None
        _scope_checks.open_scope(runtime)  # collective ledger, stall watchdog, straggler report
        _runtime.push(runtime)
        stack.callback(_runtime.pop, runtime)
        stack.callback(_run_closers, runtime)
        _preemption.install(runtime)
        if settings.seed is not None:
            from ._process import set_seed

            set_seed(settings.seed)
        return runtime

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        assert stack is not None
        if exc is not None:
            _note_failed_step(exc, self._steps_done())
        stack.__exit__(exc_type, exc, tb)

    def _steps_done(self) -> int:
        runtime = _runtime.current_or_none()
        return runtime.state.optimizer_steps if runtime is not None else 0


def _run_closers(runtime: Runtime) -> None:
    """Every closer registered with `call_on_close`, last first; each runs even when an earlier one raised."""
    with contextlib.ExitStack() as closers:
        for close in runtime.state.closers:
            closers.callback(close)


def _close_group(
    exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
) -> bool:
    close_process_group(clean=exc_type is None)
    return False


def close_process_group(*, clean: bool) -> None:
    """Destroy the default group; after a clean run, first wait until every rank has finished, and (gloo)
    until gloo's worker threads have freed every collective this scope issued.

    The barrier: a rank that tears its connections down while a peer still uses them can make that peer
    fail after its work is done.

    The wait, which keeps a finished run from aborting at exit ("terminate called without an active
    exception", torch 2.13, CPython 3.11): gloo runs collectives on worker threads of its own, and each
    collective keeps a copy of the issuing thread's torch state, Python objects included (every
    `backward()` puts a `contextvars.Context` there, so DDP's gradient all-reduces hold one). The worker
    thread that frees a collective must take the GIL to release those objects, and it frees them some
    time after the collective completed (a barrier frees the collectives it waited for only when it goes
    itself). `destroy_process_group` does not stop these threads while something still holds the group (a
    DDP model does), so without the wait they can still be freeing collectives when the interpreter
    finalizes; CPython then ends such a thread inside a C++ destructor, and the process aborts. The
    group's creator (`strategies._process_group.init_process_group`) put a marker object in this thread's torch
    state, so every collective of the scope holds it; the marker is released when the last of them has
    been freed, and the scope waits for that without holding the GIL (normally well under a millisecond).
    """
    from .strategies._process_group import GROUP_MARKER_KEY

    initialized = dist.is_initialized()
    marker = None
    try:
        if clean and initialized:
            dist.barrier()
    finally:  # always take the marker out of this thread's torch state
        if getattr(torch._C, "_is_key_in_tls", lambda key: False)(GROUP_MARKER_KEY):
            marker = torch._C._get_obj_in_tls(GROUP_MARKER_KEY)
            torch._C._remove_obj_from_tls(GROUP_MARKER_KEY)
    if marker is not None:
        released = threading.Event()
        weakref.finalize(marker, released.set).atexit = False
        del marker
        if clean:  # bounded: a collective handle the script still holds keeps the marker until dropped
            released.wait(5.0)
    if initialized:
        dist.destroy_process_group()


def _note_failed_step(exc: BaseException, step: int) -> None:
    """Put the optimizer step this scope failed at on the exception (the innermost scope's wins): the
    worker bootstrap hands it to the launcher, whose crash-loop guard compares it across restarts."""
    if getattr(exc, "distrib_optimizer_step", None) is None:
        try:
            exc.distrib_optimizer_step = step  # type: ignore[attr-defined]
        except AttributeError:  # an exception type without a __dict__
            pass


def _explicit_values(settings: Settings) -> dict[str, Any]:
    """The fields of a Settings object that differ from the defaults (what the code asked for)."""
    return _codec.explicit_fields(settings)


@overload
def distributed_main(fn: F, /) -> F: ...
@overload
def distributed_main(fn: None = None, /, **settings: Any) -> Callable[[F], F]: ...
def distributed_main(fn: Callable[..., Any] | None = None, /, **settings: Any) -> Any:
    """Run the decorated entry point inside `distributed(**settings)`.

    The function receives the runtime as its first argument when it declares a positional parameter for
    it (`def main(ctx): ...`); a function without parameters is called as is (use `current()` inside).
    Works bare or with settings. Example::

        @distributed_main(mixed_precision="bf16")
        def main(ctx):
            print(f"rank {ctx.rank} of {ctx.world_size} on {ctx.device}")

        if __name__ == "__main__":
            main()
    """
    if fn is not None and settings:
        raise SettingsError("use @distributed_main or @distributed_main(**settings), not both at once.")
    Settings.from_mapping(settings)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        wants_ctx = _takes_positional(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with distributed(**settings) as ctx:
                return func(ctx, *args, **kwargs) if wants_ctx else func(*args, **kwargs)

        return wrapper

    return decorate(fn) if fn is not None else decorate


def _takes_positional(func: Callable[..., Any]) -> bool:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(func).parameters.values()
    return any(p.kind in kinds or p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
