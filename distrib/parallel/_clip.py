"""Gradient clipping over a model split by tensor and pipeline parallelism.

torch's `clip_grad_norm_` needs every gradient on one mesh; here plain tensors (replicated parameters),
DTensors of the tensor-parallel mesh and DTensors of FSDP's 2-D mesh are mixed. The norm is taken per
group of gradients that share a mesh (a DTensor norm is completed over its mesh), the groups' norms are
combined, and under pipeline parallelism the stages' norms are combined over the pipeline group, so every
rank clips with the norm of the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .. import _precision

if TYPE_CHECKING:
    from .._runtime import Runtime


def _local(t: torch.Tensor) -> torch.Tensor:
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def total_norm(runtime: Runtime, grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of all these gradients over every rank that holds a part of the model."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    parts = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        full = getattr(norm, "full_tensor", None)
        parts.append((full() if callable(full) else norm).to(runtime.collective_device, torch.float32))
    if not parts:
        parts.append(torch.zeros((), device=runtime.collective_device))
    norms = torch.stack(parts)
    inf = math.isinf(norm_type)
    total = norms.max() if inf else norms.pow(norm_type).sum()
    parallel = runtime.parallel
    if parallel is not None and parallel.size("pp") > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=parallel.group("pp"))
    return total if inf else total.pow(1.0 / norm_type)


def clip_grad_norm_(
    runtime: Runtime, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float
) -> torch.Tensor:
    """Clip in place by the norm over the whole split model; return that norm (a plain tensor)."""
    _precision.unscale_all(runtime)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = total_norm(runtime, grads, float(norm_type))
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        local = _local(g)
        local.mul_(coefficient.to(local.device, local.dtype))
    return norm.to(runtime.device)
