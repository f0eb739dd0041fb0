"""`get_logger`: a standard `logging` logger that knows about ranks.

Records are logged on the main process only unless a call says otherwise, so a message is printed once
per job, not once per process. `in_order=True` lets every rank log in turn (rank 0 first), with a barrier
between turns. Outside a `distributed(...)` scope the logger behaves as in a single process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch.distributed as dist

from ._runtime import current_or_none


def _rank_and_world_size() -> tuple[int, int]:
    runtime = current_or_none()
    return (0, 1) if runtime is None else (runtime.rank, runtime.world_size)


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


class RankLoggerAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A `LoggerAdapter` whose calls take `main_process_only=True` and `in_order=False`.

    * `main_process_only=True` (default): only global rank 0 logs; the other ranks skip the record.
    * `main_process_only=False`: every rank logs, in whatever order they get there.
    * `in_order=True`: every rank logs, one after the other in rank order, with a barrier after each
      turn, so every rank must make the call. `main_process_only` is then ignored.

    With `rank_prefix=True` each message starts with `[rank R/W]`. Get one with `get_logger`.
    """

    def __init__(self, logger: logging.Logger, *, rank_prefix: bool = False) -> None:
        super().__init__(logger, {})
        self.rank_prefix = rank_prefix

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        if self.rank_prefix:
            rank, world_size = _rank_and_world_size()
            msg = f"[rank {rank}/{world_size}] {msg}"
        return msg, kwargs

    def log(  # type: ignore[override]
        self,
        level: int,
        msg: object,
        *args: object,
        main_process_only: bool = True,
        in_order: bool = False,
        **kwargs: Any,
    ) -> None:
        """Log `msg` at `level` on the processes chosen by `main_process_only` / `in_order`."""
        # One frame for this method, so %(funcName)s and %(lineno)d name the caller, not this file.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        rank, world_size = _rank_and_world_size()
        if in_order:
            for turn in range(world_size):
                if turn == rank and self.isEnabledFor(level):
                    self._emit(level, msg, args, kwargs)
                _barrier(world_size)
        elif (rank == 0 or not main_process_only) and self.isEnabledFor(level):
            self._emit(level, msg, args, kwargs)

    def _emit(self, level: int, msg: object, args: tuple[object, ...], kwargs: Mapping[str, Any]) -> None:
        msg, processed = self.process(msg, dict(kwargs))
        processed["stacklevel"] += 1  # and one for this helper
        self.logger.log(level, msg, *args, **processed)


def get_logger(
    name: str, log_level: int | str | None = None, *, rank_prefix: bool = False
) -> RankLoggerAdapter:
    """A logger for `name` whose calls log on the main process only unless told otherwise.

    `log_level` sets the level of the underlying `logging.Logger` (e.g. "INFO" or `logging.DEBUG`);
    None leaves it as configured. `rank_prefix=True` starts each message with `[rank R/W]`. Every call
    (`debug`, `info`, `warning`, `error`, `exception`, `critical`, `log`) takes `main_process_only=True`
    and `in_order=False` (see `RankLoggerAdapter`). Works outside a scope too, as one process. Example::

        logger = get_logger(__name__, log_level="INFO", rank_prefix=True)

        with distributed():
            logger.info("starting")                                  # once, from rank 0
            logger.info("my shard has %d rows", n, main_process_only=False)  # every rank
            logger.info("done", in_order=True)                       # every rank, rank 0 first
    """
    logger = logging.getLogger(name)
    if log_level is not None:
        logger.setLevel(log_level.upper() if isinstance(log_level, str) else log_level)
    return RankLoggerAdapter(logger, rank_prefix=rank_prefix)
