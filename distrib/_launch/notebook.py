"""Start a Python function on several processes: `notebook_launcher` and `debug_launcher`.

Both go through the same plan builder and torch elastic executor as `distrib launch`; the function runs
in each worker with RANK, WORLD_SIZE, ... and the chosen settings (`DISTRIB_*`) in its environment, so a
`with distributed() as ctx:` inside it joins the group. The first failure is raised as a `LaunchError`
naming the rank and carrying its traceback.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from ..errors import LaunchError
from . import config_file, machine
from .options import DEFAULT_MONITOR_INTERVAL, SECTIONS
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

    Works from a notebook (the function is started with `fork` when it cannot be pickled by reference,
    as for functions defined in a notebook cell) and from scripts (`spawn`; guard the call with
    `if __name__ == "__main__":`). Keyword `settings` are `Settings` fields (`mixed_precision="bf16"`, ...)
    passed to the workers. Returns the return value of each local process, in rank order. Example::

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
    values = config_file.validate_flat(_flatten_options(values), "notebook_launcher()")
    facts = machine.detect(need_gpus=not cpu)
    name = getattr(fn, "__qualname__", repr(fn))
    plan = build_plan(values, target=Target(name, "function"), machine=facts, extra_env=env)
    method = start_method or _default_start_method(fn)
    if method == "fork":
        _check_fork_is_safe()
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


def _flatten_options(values: dict[str, Any]) -> dict[str, Any]:
    """`fsdp=FSDPOptions(sharding="grad_op")` -> `{"fsdp.sharding": "grad_op"}` (fields left at default dropped)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and dataclasses.is_dataclass(value) and not isinstance(value, type):
            defaults = SECTIONS[key]()
            flat.update(
                {
                    f"{key}.{f.name}": getattr(value, f.name)
                    for f in dataclasses.fields(value)
                    if getattr(value, f.name) != getattr(defaults, f.name)
                }
            )
        elif key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


def _default_start_method(fn: Callable[..., Any]) -> str:
    """`spawn` when the child can import `fn` by name, else `fork` (functions from a notebook cell)."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is None or getattr(module, "__file__", None) is None:
        return "fork"
    return "spawn"


def _check_fork_is_safe() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise LaunchError(
            "CUDA was initialised in this process before notebook_launcher(), and a forked process cannot "
            "use it. Restart the kernel and call notebook_launcher() before any code touches the GPU "
            "(torch.cuda..., .to('cuda'))."
        )
