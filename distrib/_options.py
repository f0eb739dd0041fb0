"""Per-strategy option objects: small frozen dataclasses held by `Settings`.

They live apart from the strategy modules so that building settings (and the CLI) never imports a backend.
Each is validated by the same field-walking code as `Settings` (see `_validation.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from . import _validation
from .errors import SettingsError

FSDPSharding = Literal["full", "grad_op", "hybrid", "no_shard"]
ZeroStage = Literal[0, 1, 2, 3]
PipelineSchedule = Literal["gpipe", "1f1b"]
#: the text forms of torch's tensor-parallel styles a `tp_plan` may use (see `ParallelismOptions`)
TP_STYLES = (
    "colwise",
    "rowwise",
    "sequence",
    "colwise_gather_output",
    "colwise_from_sequence",
    "rowwise_to_sequence",
    "rowwise_from_replicate",
)
#: sizes of the device mesh, in `ParallelismOptions`' field order
MESH_SIZES = ("dp_replicate", "dp_shard", "tp", "cp", "pp")


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


@dataclass(frozen=True, kw_only=True)
class ParallelismOptions:
    """N-D parallelism on one named `DeviceMesh`: data replicate x data shard x context x tensor x pipeline.

    The sizes multiply to the number of processes; `-1` (at most one of them) means "the rest of the
    world size". `dp_replicate` and `dp_shard` are the data-parallel dimensions (with `strategy="fsdp"`,
    FSDP2 shards over `dp_shard` and replicates over `dp_replicate`; otherwise both are replicas and
    gradients are all-reduced over them), `tp` splits layers (tensor parallel), `cp` splits long sequences
    (context parallel, CUDA only), `pp` splits the stack of layers into pipeline stages.

    `tp_plan` says how each module is split: `fnmatch` patterns over module names (matching the full name
    or any dotted suffix of it) mapped to torch's parallel styles, given as objects
    (`ColwiseParallel()`, ...) or as text: "colwise", "rowwise", "sequence", "colwise_gather_output",
    "colwise_from_sequence", "rowwise_to_sequence", "rowwise_from_replicate"; None (or a pattern mapped to
    None) leaves modules replicated. The first matching pattern wins. Without a plan (None or "auto"),
    Llama-style and GPT-2-style transformers models get a built-in one. `pp_schedule` ("gpipe" or
    "1f1b") and `pp_microbatches` (default: `pp`) choose the pipeline schedule; `pp_split_points` names
    the layers that start stages 1, 2, ... (default: the model's stack of blocks split evenly).
    Example::

        with distributed(strategy="fsdp", parallelism=ParallelismOptions(dp_shard=2, tp=2)) as ctx:
            print(ctx.dp_rank, ctx.tp_rank, ctx.mesh)
        # or as a dict, a launcher flag (--tp-size 2) or a config key (parallelism: {tp: 2}):
        with distributed(parallelism={"tp": 2, "tp_plan": {"layers.*.mlp.up_proj": "colwise"}}):
            ...
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    cp: int = 1
    pp: int = 1
    tp_plan: dict[str, Any] | str | None = None
    pp_schedule: PipelineSchedule = "1f1b"
    pp_microbatches: int | None = None
    pp_split_points: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tp_plan, str) and self.tp_plan.strip().startswith("{"):
            object.__setattr__(self, "tp_plan", _plan_from_json(self.tp_plan))
        if isinstance(self.pp_split_points, str):  # text from a launcher flag: "layers.2,layers.4"
            points = tuple(p.strip() for p in self.pp_split_points.split(",") if p.strip())
            object.__setattr__(self, "pp_split_points", points)
        _validation.validate_fields(self)
        for name in MESH_SIZES:
            value = getattr(self, name)
            if value < 1 and value != -1:
                raise SettingsError(
                    f"ParallelismOptions.{name}={value} must be >= 1, or -1 for the rest of the world size."
                )
        rest = [name for name in MESH_SIZES if getattr(self, name) == -1]
        if len(rest) > 1:
            default = " (dp_shard is -1 unless given)" if "dp_shard" in rest else ""
            raise SettingsError(
                f"ParallelismOptions sets {' and '.join(rest)} to -1{default}; only one size can be 'the rest "
                "of the world size'. Give the others as numbers, e.g. dp_shard=1."
            )
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise SettingsError(f"ParallelismOptions.pp_microbatches={self.pp_microbatches} must be >= 1.")
        _check_plan(self.tp_plan)

    def sizes(self) -> dict[str, int]:
        """The five sizes as given (-1 not yet resolved), by name."""
        return {name: getattr(self, name) for name in MESH_SIZES}


def _plan_from_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"ParallelismOptions.tp_plan={text!r} is not valid JSON ({exc}).") from None


def _check_plan(plan: Any) -> None:
    if plan is None or plan == "auto":
        return
    if isinstance(plan, str):
        raise SettingsError(
            f"ParallelismOptions.tp_plan={plan!r} is not valid: give 'auto' (a built-in plan), a mapping of "
            "module-name patterns to styles, or that mapping as JSON text."
        )
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or not pattern:
            raise SettingsError(
                f"ParallelismOptions.tp_plan: the pattern {pattern!r} must be a non-empty str."
            )
        if isinstance(style, str) and style not in TP_STYLES:
            raise SettingsError(
                f"ParallelismOptions.tp_plan[{pattern!r}]={style!r} is not a style; use one of "
                f"{', '.join(map(repr, TP_STYLES))}, a torch ParallelStyle object, or None (replicated)."
            )
        if style is not None and not isinstance(style, str) and not hasattr(style, "_apply"):
            raise SettingsError(
                f"ParallelismOptions.tp_plan[{pattern!r}] is a {type(style).__name__}; give a style name "
                "such as 'colwise', a torch.distributed.tensor.parallel ParallelStyle, or None."
            )
