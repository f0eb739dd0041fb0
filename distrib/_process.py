"""Process control: who is the main process, ordering blocks across ranks, printing once, seeding."""

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

from ._runtime import current, current_or_none

F = TypeVar("F", bound=Callable[..., Any])


def is_main_process() -> bool:
    """True on global rank 0. Example: `if is_main_process(): save_report()`."""
    return current("is_main_process").is_main_process


def is_local_main_process() -> bool:
    """True on local rank 0 of each machine. Example: `if is_local_main_process(): download()`."""
    return current("is_local_main_process").is_local_main_process


def _barrier() -> None:
    from ._collectives import wait_for_everyone

    wait_for_everyone()


@contextlib.contextmanager
def _first(run_first: bool) -> Iterator[None]:
    if not run_first:
        _barrier()
    yield
    if run_first:
        _barrier()


def main_process_first() -> contextlib.AbstractContextManager[None]:
    """Run the block on the main process first, then on the others. Example::

    with main_process_first():
        dataset = load_and_cache_dataset()
    """
    return _first(current("main_process_first").is_main_process)


def local_main_process_first() -> contextlib.AbstractContextManager[None]:
    """Run the block on each machine's local main process first, then on the others. Example::

    with local_main_process_first():
        tokenizer = build_tokenizer_cache()
    """
    return _first(current("local_main_process_first").is_local_main_process)


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
