"""Per-strategy option objects: small frozen dataclasses held by `Settings`.

They live apart from the strategy modules so that building settings (and the CLI) never imports a backend.
Each is validated by the same field-walking code as `Settings` (see `_validation.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

FSDPSharding = Literal["full", "grad_op", "hybrid", "no_shard"]
ZeroStage = Literal[0, 1, 2, 3]


@dataclass(frozen=True, kw_only=True)
class DDPOptions:
    """Options passed to `torch.nn.parallel.DistributedDataParallel`.

    Example::

        with distributed(strategy="ddp", ddp=DDPOptions(find_unused_parameters=True)):
            ...
    """

    find_unused_parameters: bool = False
    bucket_cap_mb: float | None = None
    static_graph: bool = False
    gradient_as_bucket_view: bool = False
    broadcast_buffers: bool = True


@dataclass(frozen=True, kw_only=True)
class FSDPOptions:
    """Options of the FSDP2 (`fully_shard`) strategy.

    `sharding`: "full" (parameters, gradients and optimizer state sharded; parameters re-sharded after
    forward), "grad_op" (like full, but parameters stay gathered between forward and backward),
    "hybrid" (full sharding inside a group of `hybrid_shard_size` ranks, replication across groups),
    "no_shard" (replicate everything, like DDP).

    Which submodules become FSDP units: `wrap_classes` (class names), else `min_num_params` (a size
    threshold), else `auto_wrap_policy` (a callable `module -> bool`), else transformer-style blocks found by
    name. Example::

        with distributed(strategy="fsdp", fsdp=FSDPOptions(sharding="grad_op", cpu_offload=True)):
            ...
    """

    sharding: FSDPSharding = "full"
    wrap_classes: tuple[str, ...] | None = None
    min_num_params: int | None = None
    auto_wrap_policy: Callable[[Any], bool] | None = None
    hybrid_shard_size: int | None = None
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    reduce_dtype: Literal["fp32", "bf16", "fp16"] | None = None


@dataclass(frozen=True, kw_only=True)
class DeepSpeedOptions:
    """Options of the DeepSpeed strategy.

    `config` is a DeepSpeed config dict or the path of a JSON file; when it is None, one is built from the
    common knobs below. Values left as "auto" in a config are filled from distrib's own settings. Example::

        with distributed(strategy="deepspeed", deepspeed=DeepSpeedOptions(zero_stage=3)):
            ...
    """

    config: dict[str, Any] | str | None = None
    zero_stage: ZeroStage | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_clipping: float | None = None
    save_16bit_model: bool = True


@dataclass(frozen=True, kw_only=True)
class XLAOptions:
    """Options of the torch_xla strategy (TPUs and other XLA devices). Example::

    with distributed(strategy="xla", xla=XLAOptions(sync_every_step=True)):
        ...
    """

    sync_every_step: bool = True
