"""Start a Python function on several processes: `notebook_launcher` and `debug_launcher`.

Both go through the same plan builder and torch elastic executor as `distrib launch`; the function runs
in each worker with RANK, WORLD_SIZE, ... and the chosen settings (`DISTRIB_*`, through the settings
codec) in its environment, so a `with distributed() as ctx:` inside it joins the group. The first failure
is raised as a `LaunchError` naming the rank and carrying its traceback.

Start method: `spawn` starts a fresh interpreter, which must import the function by name and re-run the
caller's `__main__` file; that works for a function of a module (or of a script run from its file).
Everything else uses `fork`: functions defined in a notebook cell, in a REPL, in `python - < script.py`
or `python -c` (whose `__main__` has no file to re-run), and nested functions or lambdas.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any

from .. import _codec
from ..errors import LaunchError
from . import config_file, machine
from .options import DEFAULT_MONITOR_INTERVAL
from .plan import Target, build_plan

__all__ = ["debug_launcher", "notebook_launcher"]


def notebook_launcher(
    fn: Callable[..., Any],
    args: tuple[Any, ...] = (),
    num_processes: int | None = None,
    *,
    cpu: bool = False,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    rdzv_backend: str = "static",
    max_restarts: int = 0,
    monitor_interval: float = DEFAULT_MONITOR_INTERVAL,
    start_method: str | None = None,
    env: dict[str, str] | None = None,
    **settings: Any,
) -> list[Any]:
    """Run `fn(*args)` on `num_processes` processes (default: one per GPU, else 1) and wait for them.

    Works from a notebook, a REPL and `python - < script.py` (the function is started with `fork` when a
    fresh interpreter could not import it, as for functions defined in a notebook cell) and from scripts
    (`spawn`; guard the call with `if __name__ == "__main__":`). Keyword `settings` are `Settings` fields
    (`mixed_precision="bf16"`, `fsdp=FSDPOptions(...)`, ...) passed to the workers as text: a setting
    that holds a function (`FSDPOptions(auto_wrap_policy=...)`) cannot travel and is refused; set it in
    `distributed(...)` inside `fn`. Returns the return value of each local process, in rank order.
    Example::

        def train(lr):
            with distributed() as ctx:
                ...

        notebook_launcher(train, args=(3e-4,), num_processes=2, mixed_precision="bf16")
    """
    optional = {
        "num_processes": num_processes,
        "main_process_ip": main_process_ip,
        "main_process_port": main_process_port,
    }
    values: dict[str, Any] = {
        "num_machines": num_machines,
        "machine_rank": machine_rank,
        "rdzv_backend": rdzv_backend,
        "max_restarts": max_restarts,
        "monitor_interval": monitor_interval,
        **({"cpu": True} if cpu else {}),
        **{k: v for k, v in optional.items() if v is not None},
        **settings,
    }
    values = config_file.validate_flat(
        _codec.to_flat(values, source="notebook_launcher()"), "notebook_launcher()"
    )
    facts = machine.detect(need_gpus=not cpu, strategy=values.get("strategy"))
    name = getattr(fn, "__qualname__", repr(fn))
    plan = build_plan(values, target=Target(name, "function"), machine=facts, extra_env=env)
    method = start_method or default_start_method(fn)
    _check_start_method(fn, method)
    from .executor import run_elastic

    results = run_elastic(plan, fn, tuple(args), start_method=method, quiet=True)
    return [results[rank] for rank in sorted(results)]


def debug_launcher(fn: Callable[..., Any], args: tuple[Any, ...] = (), num_processes: int = 2) -> list[Any]:
    """Run `fn(*args)` on `num_processes` CPU processes (gloo), for tests and debugging.

    Example::

        def check():
            with distributed() as ctx:
                assert ctx.world_size == 2

        debug_launcher(check, num_processes=2)
    """
    return notebook_launcher(fn, args, num_processes, cpu=True)


def default_start_method(fn: Callable[..., Any]) -> str:
    """`spawn` when a fresh interpreter can import `fn` by name and re-run the caller's `__main__`, else
    `fork` (see the module docstring)."""
    if not _main_can_be_rerun():
        return "fork"
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    qualname = getattr(fn, "__qualname__", "")
    if module is None or not _has_real_file(module) or "<" in qualname:
        return "fork"
    return "spawn"


def _has_real_file(module: Any) -> bool:
    path = getattr(module, "__file__", None)
    return path is not None and os.path.isfile(path)


def _main_can_be_rerun() -> bool:
    """spawn re-runs the caller's `__main__` file in every child: it must exist (not `<stdin>`)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)


def _check_start_method(fn: Callable[..., Any], method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        raise LaunchError(
            f"notebook_launcher() would start {_name(fn)} with {method!r}, which this platform does not offer "
            f"(it has: {', '.join(multiprocessing.get_all_start_methods())}). "
            + _WHY_FORK.get(method, "")
            + "Define the function in a module file and import it, so it can be started with 'spawn'."
        )
    if method == "fork":
        _check_fork_is_safe()
        return
    if not _main_can_be_rerun():
        raise LaunchError(
            f"notebook_launcher(start_method={method!r}) cannot start workers from this __main__: each new "
            f"interpreter re-runs the caller's main file, and {getattr(sys.modules['__main__'], '__file__', '?')!r} "
            "is not one (a REPL, `python -` or `python -c`). Use start_method='fork' (the default here), or run "
            "the code from a file."
        )
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise LaunchError(
            f"notebook_launcher(start_method={method!r}) cannot hand {_name(fn)} to a new interpreter: it cannot "
            f"be pickled by name ({type(exc).__name__}: {exc}). Define it at the top level of a module, or use "
            "start_method='fork'."
        ) from None


_WHY_FORK = {
    "fork": "fork is needed for a function a new interpreter cannot import (defined in a notebook cell, a "
    "REPL, `python -`, or nested). "
}


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _check_fork_is_safe() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise LaunchError(
            "CUDA was initialised in this process before notebook_launcher(), and a forked process cannot "
            "use it. Restart the kernel and call notebook_launcher() before any code touches the GPU "
            "(torch.cuda..., .to('cuda'))."
        )
