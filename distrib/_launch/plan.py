"""`LaunchPlan`: everything a launch will do, as one frozen, validated value; and `build_plan`.

`build_plan` is pure: it takes the merged option values (command line over config file), the target,
facts about this machine and the SLURM step (if any), and returns the plan or raises `SettingsError`
naming the problem and its fix. Nothing here starts a process, reads the environment or imports torch,
so every rule is unit-tested directly, and `distrib launch --dry-run` prints the plan.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._environment import SlurmStep, settings_to_environment
from .._settings import Settings
from ..errors import SettingsError
from .config_file import check_combinations
from .options import LAUNCH_DEFAULTS, SECTIONS, RdzvBackend

Executor = Literal["elastic", "xla"]
TargetKind = Literal["script", "module", "function"]
DEFAULT_MULTI_MACHINE_PORT = 29500
WORKER_MODULE = "distrib._launch.worker"


@dataclass(frozen=True)
class Target:
    """What every worker runs: a script path, a module name (`-m`) or a Python function."""

    name: str
    kind: TargetKind = "script"
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class MachineFacts:
    """What the plan needs to know about this machine (detected by `machine.detect`)."""

    cpu_count: int
    gpu_count: int
    omp_num_threads: str | None = None


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """A launch, resolved: processes, rendezvous, worker environment and notes. Build with `build_plan`."""

    target: Target
    num_processes: int
    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int | None  # None: a free port, chosen when the launch starts (one machine only)
    rdzv_backend: RdzvBackend
    rdzv_timeout: int
    run_id: str
    max_restarts: int
    monitor_interval: float
    executor: Executor
    device: Literal["cpu", "cuda", "xla"]
    settings: tuple[tuple[str, Any], ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.num_machines < 1 or not 0 <= self.machine_rank < self.num_machines:
            raise SettingsError(
                f"machine_rank={self.machine_rank} is out of range for num_machines={self.num_machines}: "
                f"allowed values are 0 to {self.num_machines - 1}."
            )
        if self.num_processes < 1 or self.num_processes % self.num_machines:
            raise SettingsError(
                f"num_processes={self.num_processes} must be a positive multiple of num_machines="
                f"{self.num_machines} (every machine runs the same number of processes)."
            )
        if self.main_process_port is None and self.num_machines > 1:
            raise SettingsError("a launch over several machines needs a fixed main_process_port.")

    @property
    def processes_per_machine(self) -> int:
        return self.num_processes // self.num_machines

    @property
    def ranks(self) -> range:
        """The global ranks this machine runs."""
        first = self.machine_rank * self.processes_per_machine
        return range(first, first + self.processes_per_machine)

    @property
    def env(self) -> dict[str, str]:
        return dict(self.environment)

    def worker_args(self) -> tuple[str, ...]:
        """The interpreter arguments of every worker: the bootstrap module, then the user's target."""
        module = ("--module",) if self.target.kind == "module" else ()
        return ("-u", "-m", WORKER_MODULE, *module, self.target.name, *self.target.args)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["settings"] = {k: _plain(v) for k, v in self.settings}
        out["environment"] = dict(self.environment)
        out["sources"] = dict(self.sources)
        return out

    def describe(self) -> str:
        """A human-readable summary, printed by `--dry-run`."""
        port = (
            self.main_process_port if self.main_process_port is not None else "a free port (chosen at launch)"
        )
        lines = [
            "Launch plan",
            f"  target        : {self.target.kind} {self.target.name} {shlex.join(self.target.args)}".rstrip(),
            f"  executor      : {_EXECUTORS[self.executor]}",
            f"  processes     : {self.num_processes} in total, {self.processes_per_machine} on this machine "
            f"(global ranks {self.ranks.start}-{self.ranks.stop - 1}), device {self.device}",
            f"  machines      : {self.num_machines}; this is machine {self.machine_rank}",
            f"  rendezvous    : {self.rdzv_backend} at {self.main_process_ip}:{port}, run id {self.run_id!r}, "
            f"timeout {self.rdzv_timeout} s",
            f"  failures      : checked every {self.monitor_interval:g} s; up to {self.max_restarts} restart(s) "
            "of the worker group",
            f"  worker command: {shlex.join([sys.executable, *self.worker_args()])}",
            "  settings      : "
            + (", ".join(f"{k}={_plain(v)!r}" for k, v in self.settings) or "(defaults)"),
            "  environment   :",
        ]
        lines += [f"    {k}={v}" for k, v in self.environment] or ["    (nothing added)"]
        if self.sources:
            lines.append("  values from   : " + ", ".join(f"{k} ({s})" for k, s in self.sources))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_EXECUTORS = {
    "elastic": "torch elastic agent (torch.distributed.launcher.api.elastic_launch)",
    "xla": "torch_xla.launch (one process per local XLA device, PJRT runtime)",
}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: v for k, v in dataclasses.asdict(value).items() if not callable(v)}
    return value


def build_plan(
    values: Mapping[str, Any],
    *,
    target: Target,
    machine: MachineFacts,
    slurm: SlurmStep | None = None,
    extra_env: Mapping[str, str] | None = None,
    sources: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Resolve option values (flat keys, see `options.ROWS`) into a validated `LaunchPlan`."""
    notes: list[str] = []
    merged = {**LAUNCH_DEFAULTS, **_from_slurm(values, slurm, notes), **values}
    check_combinations(merged, "launch options")
    settings = _settings(merged, notes)
    device = _device(merged, settings, machine)
    _check_precision(settings.get("mixed_precision", "no"), device)
    num_machines = int(merged["num_machines"])
    num_processes = _num_processes(merged, device, machine, num_machines, notes)
    environment = _environment(merged, settings, device, machine, num_processes // num_machines, notes)
    environment.update(extra_env or {})
    executor: Executor = "xla" if device == "xla" else "elastic"
    _executor_notes(settings.get("strategy"), executor, num_machines, notes)
    return LaunchPlan(
        target=target,
        num_processes=num_processes,
        num_machines=num_machines,
        machine_rank=int(merged["machine_rank"]),
        main_process_ip=str(merged.get("main_process_ip") or "127.0.0.1"),
        main_process_port=_port(merged, num_machines),
        rdzv_backend=merged["rdzv_backend"],
        rdzv_timeout=int(merged["rdzv_timeout"]),
        run_id=f"distrib-{slurm.job_id}" if slurm and slurm.job_id else "distrib",
        max_restarts=int(merged["max_restarts"]),
        monitor_interval=float(merged["monitor_interval"]),
        executor=executor,
        device=device,
        settings=tuple(settings.items()),
        environment=tuple(sorted(environment.items())),
        notes=tuple(notes),
        sources=tuple(sorted((sources or {}).items())),
    )


def _from_slurm(values: Mapping[str, Any], slurm: SlurmStep | None, notes: list[str]) -> dict[str, Any]:
    """Machine count, rank and main address from the SLURM step, unless given explicitly."""
    if slurm is None:
        return {}
    if slurm.num_tasks != slurm.num_nodes:
        raise SettingsError(
            f"this SLURM step runs {slurm.num_tasks} tasks on {slurm.num_nodes} node(s); distrib launch starts "
            "the processes of its machine itself, so run one task per node: "
            "srun --ntasks-per-node=1 distrib launch ..."
        )
    found: dict[str, Any] = {"num_machines": slurm.num_nodes, "machine_rank": slurm.node_rank}
    if slurm.main_address:
        found["main_process_ip"] = slurm.main_address
    used = {k: v for k, v in found.items() if k not in values}
    if used:
        notes.append("from SLURM: " + ", ".join(f"{k}={v}" for k, v in used.items()))
    return used


def _settings(values: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """The explicitly chosen `Settings` fields (option sections as option objects), validated together."""
    chosen = {k: v for k, v in values.items() if "." not in k and k in Settings.__dataclass_fields__}
    for section, cls in SECTIONS.items():
        fields = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(section + ".")}
        if not fields:
            continue
        if section == "deepspeed" and isinstance(fields.get("config"), str):
            fields["config"] = _existing_file(fields["config"])
        _check_strategy_section(section, chosen, notes)
        chosen[section] = cls(**fields)
    try:
        Settings(**chosen)
    except TypeError as exc:  # pragma: no cover - keys were checked against the schema before
        raise SettingsError(str(exc)) from None
    return chosen


def _check_strategy_section(section: str, chosen: dict[str, Any], notes: list[str]) -> None:
    if section == "parallelism":  # not a strategy's options: it works with ddp and fsdp alike
        return
    if section in ("ddp", "xla") and chosen.get("strategy", "auto") == "auto":
        return
    strategy = chosen.get("strategy", "auto")
    if strategy == "auto":
        chosen["strategy"] = section
        notes.append(f"{section} options were given, so strategy={section!r}.")
    elif strategy != section:
        raise SettingsError(
            f"{section} options were given but strategy={strategy!r}: they apply only to strategy "
            f"{section!r}. Use --strategy {section}, or drop the {section} options."
        )


def _existing_file(path: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise SettingsError(
            f"deepspeed.config={path!r} (--deepspeed-config-file) does not exist; give the path of a "
            "DeepSpeed JSON config."
        )
    return str(resolved)


def _device(values: Mapping[str, Any], settings: Mapping[str, Any], machine: MachineFacts) -> Any:
    if settings.get("strategy") == "xla":
        return "xla"
    if values.get("cpu") or machine.gpu_count == 0:
        return "cpu"
    return "cuda"


def _check_precision(mixed_precision: str, device: str) -> None:
    if mixed_precision in ("fp16", "fp8") and device == "cpu":
        raise SettingsError(
            f"mixed_precision={mixed_precision!r} needs a GPU, but this launch runs on CPU "
            "(--cpu, or no CUDA GPU found). Use --mixed-precision bf16 (works on CPU) or no."
        )


def _gpu_ids(values: Mapping[str, Any]) -> list[str] | None:
    text = values.get("gpu_ids")
    if text is None or str(text).strip().lower() == "all":
        return None
    ids = [part.strip() for part in str(text).split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        raise SettingsError(
            f"gpu_ids={text!r} is not valid: expected comma-separated GPU numbers like '0,1', or 'all'."
        )
    return ids


def _num_processes(
    values: Mapping[str, Any], device: str, machine: MachineFacts, num_machines: int, notes: list[str]
) -> int:
    ids = _gpu_ids(values)
    if "num_processes" in values:
        total = int(values["num_processes"])
    elif device == "cuda":
        total = num_machines * (len(ids) if ids else machine.gpu_count)
    else:
        total = num_machines
    if total % num_machines:
        raise SettingsError(
            f"num_processes={total} is not a multiple of num_machines={num_machines}; every machine runs "
            f"the same number of processes (num_processes counts all machines together)."
        )
    per_machine = total // num_machines
    available = len(ids) if ids else machine.gpu_count
    if device == "cuda" and per_machine > available:
        raise SettingsError(
            f"num_processes={total} means {per_machine} processes on this machine, but it has {available} "
            f"usable GPU(s). Use --num-processes {available * num_machines}, or --cpu."
        )
    if device == "xla" and per_machine != 1:
        notes.append(
            "XLA starts one process per local XLA device; num_processes only chooses 1 (debug) or all."
        )
    return total


def _environment(
    values: Mapping[str, Any],
    settings: Mapping[str, Any],
    device: str,
    machine: MachineFacts,
    per_machine: int,
    notes: list[str],
) -> dict[str, str]:
    env = settings_to_environment(settings)
    ids = _gpu_ids(values)
    if ids is not None and device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    threads = values.get("num_cpu_threads_per_process")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif machine.omp_num_threads:
        notes.append(f"OMP_NUM_THREADS={machine.omp_num_threads} kept from your environment.")
    elif per_machine > 1:
        env["OMP_NUM_THREADS"] = str(max(1, machine.cpu_count // per_machine))
    return env


def _port(values: Mapping[str, Any], num_machines: int) -> int | None:
    port = values.get("main_process_port")
    if port is None and num_machines > 1:
        return DEFAULT_MULTI_MACHINE_PORT
    return None if port is None else int(port)


def _executor_notes(strategy: Any, executor: Executor, num_machines: int, notes: list[str]) -> None:
    if strategy == "deepspeed" and num_machines > 1:
        notes.append(
            "DeepSpeed runs under torch's elastic agent, like every other strategy: run this command on every "
            "machine (DeepSpeed's own pdsh/hostfile launcher is not used)."
        )
    if executor == "xla" and num_machines > 1:
        notes.append("XLA over several hosts: run this command on every host; PJRT finds the others itself.")
