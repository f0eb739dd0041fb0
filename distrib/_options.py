"""Per-strategy option objects: small frozen dataclasses held by `Settings`.

They live apart from the strategy modules so that building settings (and the CLI) never imports a backend.
Each is validated by the same field-walking code as `Settings` (see `_validation.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from . import _validation
from .errors import SettingsError

FSDPSharding = Literal["full", "grad_op", "hybrid", "no_shard"]
ZeroStage = Literal[0, 1, 2, 3]


@dataclass(frozen=True, kw_only=True)
class CompileOptions(_validation.KeywordFields):
    """How `torch.compile` runs on prepared models (the `compile` setting; `compile=True` takes these
    defaults). Accelerate calls this the dynamo backend.

    `backend`, `mode`, `fullgraph` and `dynamic` are `torch.compile`'s. `regional=True` compiles each
    repeated block (the layers of an `nn.ModuleList` sharing a class, e.g. transformer blocks) instead of
    the whole model: the block's code is compiled once and reused by every layer, so compiling takes a
    fraction of the time. Models are compiled in place, in torchtitan's order: after fp8 conversion,
    tensor parallelism and activation checkpointing, before FSDP2 or DDP wraps them. Example::

        with distributed(compile=CompileOptions(mode="max-autotune", regional=True)):
            ...
        # or: distributed(compile=True); launcher: --compile; config: compile: true
    """

    backend: str = "inductor"
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    regional: bool = False

    def __post_init__(self) -> None:
        _validation.validate_fields(self)
        if not self.backend:
            raise SettingsError("CompileOptions.backend='' names no backend; use 'inductor' (the default).")


@dataclass(frozen=True, kw_only=True)
class DDPOptions(_validation.KeywordFields):
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

    def __post_init__(self) -> None:
        _validation.validate_fields(self)
        if self.bucket_cap_mb is not None and not self.bucket_cap_mb > 0:
            raise SettingsError(
                f"DDPOptions.bucket_cap_mb={self.bucket_cap_mb} must be a positive size in MiB (DDP's default "
                "is 25), or None for the default."
            )


@dataclass(frozen=True, kw_only=True)
class FSDPOptions(_validation.KeywordFields):
    """Options of the FSDP2 (`torch.distributed.fsdp.fully_shard`) strategy.

    `sharding`:

    * "full": parameters, gradients and optimizer state sharded; parameters re-sharded after forward;
    * "grad_op": like "full", but parameters stay gathered between forward and backward
      (`reshard_after_forward=False`: more memory, one all-gather less per unit);
    * "hybrid": full sharding inside groups of `hybrid_shard_size` ranks (default: the ranks of one
      machine), replication across the groups (a 2-D replicate x shard device mesh);
    * "no_shard": replicate everything, like DDP (a world x 1 mesh).

    Which submodules become FSDP units (each one all-gathers its parameters as a whole), first match wins:
    `wrap_classes` (class names; an error lists the names present when one matches nothing),
    `min_num_params` (any submodule holding at least that many parameters not already in a unit),
    `auto_wrap_policy` (a callable `module -> bool`), else the transformer-style blocks found with no
    configuration: children of an `nn.ModuleList` whose class name ends in "Block" or "Layer". The root
    module is always a unit too.

    `reduce_dtype` is the dtype gradients are reduced in under `mixed_precision="bf16"` (default "fp32";
    parameters are computed in bf16). `cpu_offload` keeps sharded parameters, gradients and optimizer
    state on the CPU. `activation_checkpointing` recomputes each unit's activations in backward.
    `compile=True` is the run-wide `compile` setting with `CompileOptions(regional=True)`: each unit is
    compiled before it is sharded (the root when there are no units).
    Example::

        with distributed(strategy="fsdp", fsdp=FSDPOptions(sharding="grad_op", cpu_offload=True)):
            ...
        # or, as a dict / launcher flag: fsdp={"sharding": "hybrid", "hybrid_shard_size": 8}
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

    def __post_init__(self) -> None:
        _validation.validate_fields(self)
        policies = [
            name
            for name in ("wrap_classes", "min_num_params", "auto_wrap_policy")
            if getattr(self, name) is not None
        ]
        if len(policies) > 1:
            raise SettingsError(
                f"FSDPOptions got {' and '.join(policies)}; give only one way of choosing the FSDP units."
            )
        if self.wrap_classes is not None and not self.wrap_classes:
            raise SettingsError("FSDPOptions.wrap_classes=() names no class; give class names or None.")
        for name in ("min_num_params", "hybrid_shard_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingsError(f"FSDPOptions.{name}={value} must be >= 1 (or None).")
        if self.hybrid_shard_size is not None and self.sharding != "hybrid":
            raise SettingsError(
                f"FSDPOptions.hybrid_shard_size={self.hybrid_shard_size} only applies to "
                f"sharding='hybrid', but sharding={self.sharding!r}; set sharding='hybrid' or drop it."
            )


@dataclass(frozen=True, kw_only=True)
class DeepSpeedOptions(_validation.KeywordFields):
    """Options of the DeepSpeed strategy (needs `pip install 'distrib[deepspeed]'`).

    `config` is a DeepSpeed config dict or the path of a JSON file. Without one, a config is built from
    the common knobs below; with one, the knobs that are set must agree with it. Values "auto" in the
    config (and keys left out) are filled from distrib's settings and the first prepared dataloader:
    `train_micro_batch_size_per_gpu` (the loader's per-process batch size), `gradient_accumulation_steps`,
    `train_batch_size` (micro x accumulation x processes), `bf16`/`fp16` (from `mixed_precision`) and
    `gradient_clipping`. A value in the config that contradicts a distrib setting is a `SettingsError`
    naming both.

    `offload_optimizer` / `offload_params` move optimizer state / parameters (ZeRO-3) to the CPU.
    `save_16bit_model`: `save_model` gathers the weights in the training dtype (True) or the fp32 master
    weights (False). Example::

        with distributed(strategy="deepspeed", deepspeed=DeepSpeedOptions(zero_stage=3)):
            ...
        # or: deepspeed=DeepSpeedOptions(config="ds_config.json")
    """

    config: dict[str, Any] | str | None = None
    zero_stage: ZeroStage | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_clipping: float | None = None
    save_16bit_model: bool = True

    def __post_init__(self) -> None:
        _validation.validate_fields(self)
        if self.gradient_clipping is not None and self.gradient_clipping < 0:
            raise SettingsError(
                f"DeepSpeedOptions.gradient_clipping={self.gradient_clipping} must be >= 0 (0 disables it)."
            )
        self._check_offload()

    def _check_offload(self) -> None:
        """Offloads an explicit ZeRO stage cannot honour, refused where they are written (the launcher's flags
        included) rather than when the engine starts. Without a stage here, it comes from the config file or
        from options merged later (code and launcher), and the DeepSpeed config builder checks it."""
        stage = self.zero_stage
        if stage is None:
            return
        if self.offload_params and stage != 3:
            raise SettingsError(
                f"DeepSpeedOptions.offload_params=True needs ZeRO stage 3 (only ZeRO-3 partitions the "
                f"parameters it could offload), but the stage is {stage}; set zero_stage=3 (--zero-stage 3), "
                "or offload only the optimizer state (offload_optimizer works with ZeRO 1 and 2)."
            )
        if self.offload_optimizer and stage == 0:
            raise SettingsError(
                "DeepSpeedOptions.offload_optimizer=True needs ZeRO stage 1, 2 or 3, but the stage is 0. "
                "Set zero_stage (--zero-stage 2), or drop the offload."
            )


@dataclass(frozen=True, kw_only=True)
class XLAOptions(_validation.KeywordFields):
    """Options of the torch_xla strategy (TPUs and other XLA devices; `pip install 'distrib[xla]'`).

    `sync_every_step`: cut the lazy graph (`torch_xla.sync()` / `xm.mark_step()`) after every optimizer
    step. Turn it off only when something else cuts it (the prepared dataloader also does, once per
    batch). `loader_prefetch_size` / `device_prefetch_size` are passed to `MpDeviceLoader`, which uploads
    batches to the device in the background. Example::

        with distributed(strategy="xla", xla=XLAOptions(sync_every_step=True)):
            ...
    """

    sync_every_step: bool = True
    loader_prefetch_size: int = 8
    device_prefetch_size: int = 4

    def __post_init__(self) -> None:
        _validation.validate_fields(self)
        for name in ("loader_prefetch_size", "device_prefetch_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"XLAOptions.{name}={getattr(self, name)} must be >= 1.")
