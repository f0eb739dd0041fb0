"""The launch options, as one table: each row is a `distrib launch` flag and a config-file key.

A row names its config key (`num_processes`, or `fsdp.sharding` inside a section), its help text and its
heading in `--help`. Rows that carry a `Settings` field take their type from that field's annotation, so
`click.Choice` lists come from the same `Literal`s the runtime validates against and cannot drift apart.
Every flag also answers to Accelerate's underscore spelling (`--num_processes`), hidden from `--help`.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from .. import _validation
from .._codec import SECTIONS
from .._settings import settings_field_types
from . import rules

RdzvBackend = Literal["static", "c10d"]

DEFAULT_MONITOR_INTERVAL = 0.2
DEFAULT_GRACE_PERIOD = 30.0


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
    #: normalises and validates a value after its type check: (value, source) -> value
    convert: Callable[[Any, str], Any] | None = None

    @property
    def is_setting(self) -> bool:
        """True when the value becomes a `Settings` field (a `DISTRIB_*` variable in the workers)."""
        return self.annotation is None

    @property
    def option_flag(self) -> str:
        return self.flag or "--" + self.key.replace(".", "-").replace("_", "-")

    @property
    def alias_flag(self) -> str | None:
        """Accelerate's spelling of the flag (`--num_processes`), accepted as a hidden alias."""
        alias = "--" + self.option_flag[2:].replace("-", "_")
        return alias if alias != self.option_flag else None

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
        "num_processes_per_machine",
        "Worker processes on each machine, instead of --num-processes (needed with an elastic "
        "--num-machines MIN:MAX, where the total varies). Default: one per GPU (of --gpu-ids), else 1.",
        P,
        int,
        minimum=1,
    ),
    Row(
        "num_machines",
        "Number of machines; run the same command on each, with its own --machine-rank. MIN:MAX (e.g. 1:4, "
        "with --rdzv-backend c10d) makes the run elastic: it starts once MIN machines have joined, and when "
        "a machine leaves or joins, the worker group restarts at the new size.",
        P,
        int | str,
        default=1,
        convert=rules.machine_count,
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
        "rdzv_conf",
        "Extra settings of torch's rendezvous, as KEY=VALUE,... (as torchrun's --rdzv-conf), e.g. "
        "last_call_timeout=5 (c10d: seconds to wait for more machines once MIN joined; default 30), "
        "keep_alive_interval=2,keep_alive_max_attempt=3 (how fast a lost machine is noticed).",
        R,
        str,
        convert=rules.rdzv_conf,
    ),
    Row(
        "max_restarts",
        "Restart the whole worker group up to N times after a failure "
        "(TORCHELASTIC_RESTART_COUNT tells the workers which attempt runs). When an attempt fails at the "
        "same optimizer step as the one before, the launcher stops: a crash loop.",
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
    Row(
        "grace_period",
        "Seconds the workers get to save and exit after the launcher forwarded SIGTERM or SIGUSR1 to "
        "them (or was interrupted), before it kills them.",
        R,
        float,
        minimum=0,
        default=DEFAULT_GRACE_PERIOD,
    ),
    Row("strategy", "How the model is distributed; auto: ddp with several processes, else single.", T),
    Row(
        "mixed_precision",
        "Mixed precision of forward and backward (fp8 needs a GPU; fp16 scales the loss, also on CPU).",
        T,
    ),
    Row("gradient_accumulation_steps", "Micro-batches per optimizer step in accumulate().", T, minimum=1),
    Row("seed", "Seed every rank's random generators with this value.", T),
    Row(
        "compile",
        "torch.compile the prepared models (in place, before DDP/FSDP2 wrap them); CompileOptions in the "
        "config file (compile: {mode: max-autotune, regional: true}) or in code choose how.",
        T,
    ),
    Row(
        "sync_each_batch",
        "Synchronise gradients on every accumulation micro-batch (less memory under FSDP, more traffic).",
        T,
    ),
    Row(
        "split_batches",
        "Split each batch of a prepared dataloader across processes instead of giving "
        "every process a whole batch.",
        T,
    ),
    Row(
        "timeout",
        "Seconds a collective may wait for the other ranks before the process group gives up "
        "(torch's process-group timeout; default 1800).",
        T,
        minimum=0.001,
    ),
    Row(
        "stall_timeout",
        "Seconds without progress after which every rank dumps its stacks and the launcher names the "
        "rank that is not in the collective (default 300); 'none' turns the watchdog off.",
        T,
        minimum=0.001,
    ),
    Row(
        "preemption_exit_code",
        "Exit code of a run that saved and stopped after SIGTERM/SIGUSR1 (preemption; default 75, "
        "EX_TEMPFAIL); the launcher then exits with it too: 'try again'. 'none': the workers leave the "
        "signals alone (no save, and no agreement on them at every optimizer step).",
        T,
        minimum=0,
        maximum=255,
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
        "deepspeed.offload_optimizer",
        "Keep DeepSpeed optimizer state on CPU (ZeRO 1, 2 or 3).",
        D,
        flag="--offload-optimizer",
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
