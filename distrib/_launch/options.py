"""The launch options, as one table: each row is a `distrib launch` flag and a config-file key.

A row names its config key (`num_processes`, or `fsdp.sharding` inside a section), its help text and its
heading in `--help`. Rows that carry a `Settings` field take their type from that field's annotation, so
`click.Choice` lists come from the same `Literal`s the runtime validates against and cannot drift apart.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from .. import _validation
from .._options import DDPOptions, DeepSpeedOptions, FSDPOptions, ParallelismOptions, XLAOptions
from .._settings import settings_field_types

RdzvBackend = Literal["static", "c10d"]

#: config-file sections that hold a per-strategy option object (`fsdp: {sharding: grad_op}`)
SECTIONS: dict[str, type] = {
    "ddp": DDPOptions,
    "fsdp": FSDPOptions,
    "deepspeed": DeepSpeedOptions,
    "xla": XLAOptions,
    "parallelism": ParallelismOptions,
}

DEFAULT_MONITOR_INTERVAL = 0.2


@dataclass(frozen=True)
class Row:
    """One launch option. `annotation=None` means: the type of the `Settings` field the key names."""

    key: str
    help: str
    section: str
    annotation: Any = None
    flag: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    default: Any = None
    sets: str | None = None

    @property
    def is_setting(self) -> bool:
        """True when the value becomes a `Settings` field (a `DISTRIB_*` variable in the workers)."""
        return self.annotation is None

    @property
    def option_flag(self) -> str:
        return self.flag or "--" + self.key.replace(".", "-").replace("_", "-")

    @property
    def param_name(self) -> str:
        return self.key.replace(".", "__")

    @property
    def type(self) -> Any:
        if self.annotation is not None:
            return self.annotation
        return setting_annotation(self.key)

    @property
    def environment_variable(self) -> str | None:
        if self.sets:
            return self.sets
        if self.is_setting:
            return "DISTRIB_" + self.key.split(".")[0].upper()
        return None


def setting_annotation(key: str) -> Any:
    """The annotation of a `Settings` field (`mixed_precision`) or option field (`fsdp.sharding`)."""
    if "." in key:
        section, name = key.split(".", 1)
        return _validation.field_types(SECTIONS[section])[name]
    return settings_field_types()[key]


P, R, T, F, D = "Processes", "Rendezvous and restarts", "Training settings", "FSDP", "DeepSpeed"
N = "N-D parallelism (sizes multiply to the number of processes; -1: the rest)"
ROWS: tuple[Row, ...] = (
    Row(
        "num_processes",
        "Total number of worker processes over all machines; each machine runs "
        "num_processes / num_machines of them. Default: one per GPU (of --gpu-ids), else 1 per machine.",
        P,
        int,
        minimum=1,
    ),
    Row(
        "num_machines",
        "Number of machines; run the same command on each, with its own --machine-rank.",
        P,
        int,
        minimum=1,
        default=1,
    ),
    Row(
        "machine_rank",
        "Rank of this machine, 0 to num_machines - 1. Machine 0 hosts the rendezvous.",
        P,
        int,
        minimum=0,
        default=0,
    ),
    Row("cpu", "Run on CPU even when GPUs are present.", P),
    Row("gpu_ids", "GPUs this machine may use, e.g. '0,1', or 'all'.", P, str, sets="CUDA_VISIBLE_DEVICES"),
    Row(
        "num_cpu_threads_per_process",
        "Threads per process for CPU math. Default when several processes "
        "share a machine: its CPU cores // processes per machine, at least 1 (a value already exported "
        "in OMP_NUM_THREADS is kept).",
        P,
        int,
        minimum=1,
        sets="OMP_NUM_THREADS",
    ),
    Row(
        "main_process_ip",
        "Address of machine 0, reachable from every machine. Required with "
        "num_machines > 1 (under srun: the first node of the step). Default on one machine: 127.0.0.1.",
        R,
        str,
        sets="MASTER_ADDR",
    ),
    Row(
        "main_process_port",
        "Rendezvous port on machine 0. Default: a free port on one machine, 29500 on several.",
        R,
        int,
        minimum=1,
        maximum=65535,
        sets="MASTER_PORT",
    ),
    Row(
        "rdzv_backend",
        "static: every machine has a fixed rank (its --machine-rank). c10d: torch's "
        "dynamic rendezvous, hosted by machine 0; machines may join in any order and get node ranks in "
        "the order they join.",
        R,
        RdzvBackend,
        default="static",
    ),
    Row("rdzv_timeout", "Seconds to wait for every machine to join.", R, int, minimum=1, default=900),
    Row(
        "max_restarts",
        "Restart the whole worker group up to N times after a failure "
        "(TORCHELASTIC_RESTART_COUNT tells the workers which attempt runs).",
        R,
        int,
        minimum=0,
        default=0,
    ),
    Row(
        "monitor_interval",
        "Seconds between health checks of the workers; after a failure the others "
        "are stopped within about this time.",
        R,
        float,
        minimum=0.01,
        default=DEFAULT_MONITOR_INTERVAL,
    ),
    Row("strategy", "How the model is distributed; auto: ddp with several processes, else single.", T),
    Row("mixed_precision", "Mixed precision of forward and backward (fp16 and fp8 need a GPU).", T),
    Row("gradient_accumulation_steps", "Micro-batches per optimizer step in accumulate().", T, minimum=1),
    Row("seed", "Seed every rank's random generators with this value.", T),
    Row(
        "split_batches",
        "Split each batch of a prepared dataloader across processes instead of giving "
        "every process a whole batch.",
        T,
    ),
    Row("fsdp.sharding", "What FSDP shards (FSDPOptions.sharding).", F),
    Row("fsdp.cpu_offload", "Keep FSDP parameters and optimizer state on CPU.", F),
    Row("fsdp.activation_checkpointing", "Recompute FSDP units' activations in backward.", F),
    Row(
        "deepspeed.config",
        "A DeepSpeed JSON config; 'auto' values in it are filled in by distrib.",
        D,
        str,
        flag="--deepspeed-config-file",
        sets="DISTRIB_DEEPSPEED",
    ),
    Row("deepspeed.zero_stage", "DeepSpeed ZeRO stage.", D, flag="--zero-stage"),
    Row(
        "deepspeed.offload_optimizer", "Keep DeepSpeed optimizer state on CPU.", D, flag="--offload-optimizer"
    ),
    Row("deepspeed.offload_params", "Keep DeepSpeed parameters on CPU (ZeRO 3).", D, flag="--offload-params"),
    Row(
        "parallelism.dp_replicate",
        "Data-parallel replicas (with --strategy fsdp: FSDP2 replicates over them, HSDP).",
        N,
        flag="--dp-replicate-size",
    ),
    Row(
        "parallelism.dp_shard",
        "Data-parallel ranks that shard the model (FSDP2); -1: the rest of the world size.",
        N,
        flag="--dp-shard-size",
    ),
    Row(
        "parallelism.tp", "Tensor-parallel ranks: each layer's weights split over them.", N, flag="--tp-size"
    ),
    Row(
        "parallelism.cp",
        "Context-parallel ranks: long sequences split over them (CUDA).",
        N,
        flag="--cp-size",
    ),
    Row("parallelism.pp", "Pipeline stages: the stack of layers split over them.", N, flag="--pp-size"),
    Row(
        "parallelism.tp_plan",
        "Tensor-parallel plan as JSON, module-name patterns to styles, e.g. "
        '\'{"layers.*.mlp.up_proj": "colwise"}\'; default: a built-in plan (Llama, GPT-2).',
        N,
        flag="--tp-plan",
    ),
    Row("parallelism.pp_schedule", "Pipeline schedule.", N, flag="--pp-schedule"),
    Row(
        "parallelism.pp_microbatches",
        "Micro-batches per pipeline step (default: --pp-size).",
        N,
        flag="--pp-microbatches",
    ),
)
ROWS_BY_KEY: dict[str, Row] = {row.key: row for row in ROWS}
LAUNCH_DEFAULTS: dict[str, Any] = {row.key: row.default for row in ROWS if row.default is not None}


def strip_none(tp: Any) -> Any:
    """`int | None` -> `int`; other annotations unchanged."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp
