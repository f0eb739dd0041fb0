"""A runtime built by hand, as one rank of a job of any size, for tests of functions that only read it
(logging, tracking, the watchdog): no process group is created."""

from __future__ import annotations

from typing import Any

import torch

from distrib._runtime import Runtime
from distrib._settings import Settings
from distrib.strategies import single


def fake_runtime(
    rank: int = 0, world_size: int = 1, local_rank: int | None = None, **settings: Any
) -> Runtime:
    """A CPU runtime of the `single` strategy that says it is `rank` of `world_size`."""
    chosen = Settings(**settings)
    return Runtime(
        settings=chosen,
        strategy_module=single,
        precision=single.precision_plan(chosen, torch.device("cpu")),
        rank=rank,
        local_rank=rank if local_rank is None else local_rank,
        world_size=world_size,
        local_world_size=world_size,
        node_rank=0,
        num_nodes=1,
        device=torch.device("cpu"),
        launcher="python",
    )
