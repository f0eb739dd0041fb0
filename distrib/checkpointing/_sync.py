"""The few collectives checkpointing needs, and a way to make every rank agree on a failure.

A rank that raises while the others wait in a collective would hang them until the process-group timeout.
`run_on_every_rank` runs a step on every rank and exchanges the outcome, so when any rank fails, every rank raises
(the failing rank its own exception, the others a copy naming the rank). Every function takes an optional
`group`: background saves agree on a process group of their own, from their own thread, so that they
never interleave with the collectives of the training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist

from .. import errors
from ..errors import CheckpointError

if TYPE_CHECKING:
    from .._runtime import Runtime

T = TypeVar("T")


def barrier(runtime: Runtime, group: Any = None) -> None:
    if runtime.world_size > 1:
        dist.barrier(group=group)


def broadcast_from_main(runtime: Runtime, value: Any, group: Any = None) -> Any:
    """Rank 0's `value` on every rank."""
    if runtime.world_size == 1:
        return value
    box = [value if runtime.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_gather(runtime: Runtime, value: Any, group: Any = None) -> list[Any]:
    """Every rank's `value`, in rank order."""
    if runtime.world_size == 1:
        return [value]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, value, group=group)
    return out


def run_on_every_rank(runtime: Runtime, what: str, step: Callable[[], T], group: Any = None) -> list[T]:
    """Run `step()` on every rank and return every rank's result, in rank order; if it raised anywhere,
    raise on every rank (the same error class and message, naming the rank that failed)."""
    try:
        result: T | None = step()
        failure: BaseException | None = None
    except Exception as e:
        result, failure = None, e
    report = ("ok", result) if failure is None else ("error", (type(failure).__name__, str(failure)))
    reports = all_gather(runtime, report, group)
    if failure is not None:
        raise failure
    for rank, (status, value) in enumerate(reports):
        if status == "error":
            name, message = value
            cls = getattr(errors, name, None)
            if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
                cls, message = CheckpointError, f"{name}: {message}"
            raise cls(f"{what} failed on rank {rank}: {message}")
    return [value for _, value in reports]
