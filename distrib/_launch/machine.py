"""Facts about this machine for the plan: CPU cores, GPUs, an `OMP_NUM_THREADS` already exported, whether
the chosen strategy can run here, and whether a `-m` module can be found.

Counting GPUs imports torch (about a second), so it is skipped when the answer cannot matter (`--cpu`).
"""

from __future__ import annotations

import importlib.machinery
import os
from collections.abc import Sequence

from .. import _environment
from .plan import MachineFacts

#: strategies whose availability depends on an optional package (checked only when chosen)
_OPTIONAL_STRATEGIES = ("deepspeed", "xla", "fsdp")


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def gpu_count() -> int:
    """Number of CUDA GPUs torch can see (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def unavailable_strategy(name: str | None) -> dict[str, str]:
    """{name: reason} when the strategy `name` cannot run here (its strategy module says why), else {}."""
    if name not in _OPTIONAL_STRATEGIES:
        return {}
    from .. import strategies  # imports torch: only for a strategy that needs the check

    module = strategies.load(str(name))
    return {} if module.is_available() else {str(name): str(module.unavailable_reason())}


def detect(*, need_gpus: bool = True, strategy: str | None = None) -> MachineFacts:
    return MachineFacts(
        cpu_count=cpu_count(),
        gpu_count=gpu_count() if need_gpus else 0,
        omp_num_threads=_environment.omp_num_threads(),
        unavailable=unavailable_strategy(strategy),
    )


def module_exists(name: str, search_path: Sequence[str]) -> bool:
    """Whether `python -m name` would find the module on `search_path`, without importing (running) any
    package `__init__` on the way, as `importlib.util.find_spec` would."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return False
    locations: list[str] | None = list(search_path)
    spec = None
    for part in parts:
        if locations is None:  # the previous part is a plain module, which has no submodules
            return False
        spec = importlib.machinery.PathFinder.find_spec(part, locations)
        if spec is None:
            return False
        locations = list(spec.submodule_search_locations or []) or None
    return spec is not None
