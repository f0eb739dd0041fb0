"""Process control: who is the main process, running code on one rank, ordering blocks across ranks,
printing once, seeding."""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import random
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from ._collectives import barrier
from ._ledger import Site, call_site
from ._runtime import Runtime, current, current_or_none
from .errors import TrainingError

F = TypeVar("F", bound=Callable[..., Any])


def is_main_process() -> bool:
    """True on global rank 0. Example: `if is_main_process(): save_report()`."""
    return current("is_main_process").is_main_process


def is_local_main_process() -> bool:
    """True on local rank 0 of each machine. Example: `if is_local_main_process(): download()`."""
    return current("is_local_main_process").is_local_main_process


@contextlib.contextmanager
def _first(runtime: Runtime, run_first: bool, op: str, site: Site) -> Iterator[None]:
    # the ranks that go first meet the others at the end of the block, the others at its start: one
    # collective, named after the `with` line on every rank
    if runtime.world_size == 1:
        yield
        return
    if not run_first:
        barrier(runtime, site, op)
    yield
    if run_first:
        barrier(runtime, site, op)


def main_process_first() -> contextlib.AbstractContextManager[None]:
    """Run the block on the main process first, then on the others. Example::

    with main_process_first():
        dataset = load_and_cache_dataset()
    """
    runtime = current("main_process_first")
    return _first(runtime, runtime.is_main_process, "main_process_first", call_site(1))


def local_main_process_first() -> contextlib.AbstractContextManager[None]:
    """Run the block on each machine's local main process first, then on the others. Example::

    with local_main_process_first():
        tokenizer = build_tokenizer_cache()
    """
    runtime = current("local_main_process_first")
    return _first(runtime, runtime.is_local_main_process, "local_main_process_first", call_site(1))


def on_main_process(fn: F) -> F:
    """Decorator: run the function only on the main process (others return None). Example::

    @on_main_process
    def report(metrics): ...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if current(fn.__name__).is_main_process else None

    return wrapper  # type: ignore[return-value]


def on_local_main_process(fn: F) -> F:
    """Decorator: run the function only on each machine's local main process. Example::

    @on_local_main_process
    def show_progress(step): ...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if current(fn.__name__).is_local_main_process else None

    return wrapper  # type: ignore[return-value]


def on_last_process(fn: F) -> F:
    """Decorator: run the function only on the last process (rank `world_size - 1`); others return None.

    Example::

        @on_last_process
        def report(metrics): ...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if current(fn.__name__).is_last_process else None

    return wrapper  # type: ignore[return-value]


def on_process(rank: int) -> Callable[[F], F]:
    """Decorator factory: run the function only on global rank `rank`; the others return None.

    Calling the function in a run that has no such rank raises `TrainingError` instead of silently
    never running it. Example::

        @on_process(1)
        def write_shard_index(index): ...
    """
    if callable(rank) and not isinstance(rank, int):
        raise TypeError(
            f"on_process needs the rank to run on: write @on_process(1) above {getattr(rank, '__name__', 'it')}, "
            "not @on_process."
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise TypeError(f"on_process(rank={rank!r}) needs a rank number >= 0.")

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            runtime = current(fn.__name__)
            if rank >= runtime.world_size:
                raise TrainingError(
                    f"{fn.__name__}() is decorated with @on_process({rank}), but the run has "
                    f"{runtime.world_size} process{'es' if runtime.world_size > 1 else ''} (ranks 0 to "
                    f"{runtime.world_size - 1}), so it would never run; pick a rank below {runtime.world_size}, "
                    "or use @on_last_process."
                )
            return fn(*args, **kwargs) if runtime.rank == rank else None

        return wrapper  # type: ignore[return-value]

    return decorate


def print(*args: Any, **kwargs: Any) -> None:
    """`print` once per machine (on each local main process). Example: `distrib.print(f"loss {loss:.3f}")`."""
    if current("print").is_local_main_process:
        builtins.print(*args, **kwargs)


def set_seed(seed: int, device_specific: bool = False, deterministic: bool = False) -> int:
    """Seed python, numpy and torch (CPU and every GPU); return the seed used.

    `device_specific=True` adds the rank so that every process draws different numbers (for data
    augmentation); `deterministic=True` also asks torch for deterministic algorithms. Example::

        set_seed(42)
    """
    runtime = current_or_none()
    if device_specific and runtime is not None:
        seed += runtime.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    return seed
