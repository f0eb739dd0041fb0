"""N-D parallelism on torch's DeviceMesh: data (replicate x shard), tensor, context and pipeline parallel.

Everything runs on torch's own engine: `torch.distributed.device_mesh` for the mesh,
`torch.distributed.tensor.parallel` for tensor parallel, `torch.distributed.pipelining` for pipeline
parallel, `torch.distributed.tensor.experimental.context_parallel` for context parallel, FSDP2 for sharding.

* `_mesh.py`: sizes resolved against the world size, the one named mesh (`runtime.parallel`);
* `_plans.py`, `_styles.py`: tensor-parallel plans (patterns, style names, built-in plans);
* `_split.py`, `_pipeline.py`: cutting a model into stages; the prepared model that runs the schedule;
* `_compose.py`: the order of it all at `prepare` (torchtitan's), for the DDP and FSDP strategies;
* `_clip.py`, `_checkpoint.py`: gradient norms and checkpoints of split models;
* `_context.py`: `context_parallel()` (CUDA only).

The strategies call in here only when the run has a mesh (the `parallelism` setting is used).
"""

from __future__ import annotations

from ._mesh import DIM_NAMES, ParallelDims, ParallelState, build, plan, resolve_dims

__all__ = ["DIM_NAMES", "ParallelDims", "ParallelState", "build", "plan", "resolve_dims"]
