"""Facts about this machine for the plan: CPU cores, GPUs, an `OMP_NUM_THREADS` already exported.

Counting GPUs imports torch (about a second), so it is skipped when the answer cannot matter (`--cpu`).
"""

from __future__ import annotations

import os

from .. import _environment
from .plan import MachineFacts


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


def detect(*, need_gpus: bool = True) -> MachineFacts:
    return MachineFacts(
        cpu_count=cpu_count(),
        gpu_count=gpu_count() if need_gpus else 0,
        omp_num_threads=_environment.omp_num_threads(),
    )
