"""`LaunchPlan`: everything a launch will do, as one frozen, validated value; and `build_plan`.

`build_plan` is pure: it takes the merged option values (command line over config file), the target,
facts about this machine and the SLURM step (if any), and returns the plan or raises `SettingsError`
naming the problem and its fix. Nothing here starts a process, reads the environment or imports torch,
so every rule is unit-tested directly, and `distrib launch --dry-run` prints the plan. The rules
themselves live in `rules.py`, shared with the config file and `distrib config`.
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import _codec
from .._environment import SlurmStep
from .._settings import Settings
from ..errors import SettingsError
from . import rules
from .options import DEFAULT_GRACE_PERIOD, LAUNCH_DEFAULTS, SECTIONS, RdzvBackend

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
    """What the plan needs to know about this machine (detected by `machine.detect`).

    `unavailable` maps a strategy that cannot run here to the reason (its missing package), for the
    strategies that were checked."""

    cpu_count: int
    gpu_count: int
    omp_num_threads: str | None = None
    unavailable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """A launch, resolved: processes, rendezvous, worker environment and notes. Build with `build_plan`.

    `num_machines` is the fixed machine count, or the minimum of an elastic range whose maximum is
    `max_machines` (None when the run is not elastic); `num_processes` counts the processes at
    `num_machines` machines.
    """

    target: Target
    num_processes: int
    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int | None  # None: a free port, chosen when the launch starts (one machine only)
    rdzv_backend: RdzvBackend
    rdzv_timeout: int
    rdzv_conf: tuple[tuple[str, str], ...] = ()
    run_id: str
    max_restarts: int
    monitor_interval: float
    executor: Executor
    device: Literal["cpu", "cuda", "xla"]
    max_machines: int | None = None
    grace_period: float = DEFAULT_GRACE_PERIOD
    settings: tuple[tuple[str, Any], ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        low, high = self.machine_count
        machines: int | str = low if low == high else f"{low}:{high}"
        values = {
            "num_machines": machines,
            "machine_rank": self.machine_rank,
            "main_process_ip": self.main_process_ip,
            "rdzv_backend": self.rdzv_backend,
        }
        rules.check_machines(values, "launch plan")
        rules.check_processes(self.num_processes, self.num_machines, "launch plan")
        if self.main_process_port is None and self.machine_count[1] > 1:
            raise SettingsError("a launch over several machines needs a fixed main_process_port.")

    @property
    def machine_count(self) -> tuple[int, int]:
        """(minimum, maximum) number of machines; equal unless the run is elastic."""
        return self.num_machines, int(self.max_machines or self.num_machines)

    @property
    def is_elastic(self) -> bool:
        return self.machine_count[0] != self.machine_count[1]

    @property
    def processes_per_machine(self) -> int:
        return self.num_processes // self.num_machines

    @property
    def ranks(self) -> range:
        """The global ranks this machine runs (under an elastic range: if it joins as `machine_rank`)."""
        first = self.machine_rank * self.processes_per_machine
        return range(first, first + self.processes_per_machine)

    @property
    def env(self) -> dict[str, str]:
        return dict(self.environment)

    @property
    def preemption_exit_code(self) -> int | None:
        """The exit code with which workers say "preempted, saved, try again" (the setting's value;
        None: the workers do not catch the signals)."""
        value = dict(self.settings).get("preemption_exit_code", Settings.preemption_exit_code)
        return None if value is None else int(value)

    def worker_args(self) -> tuple[str, ...]:
        """The interpreter arguments of every worker: the bootstrap module, then the user's target."""
        module = ("--module",) if self.target.kind == "module" else ()
        return ("-u", "-m", WORKER_MODULE, *module, self.target.name, *self.target.args)

    def flat_settings(self) -> dict[str, Any]:
        """The chosen settings as flat keys (`fsdp.sharding`), as the config file writes them."""
        return _codec.to_flat(dict(self.settings))

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["target"] = {"name": self.target.name, "kind": self.target.kind, "args": list(self.target.args)}
        out["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.flat_settings().items()}
        out["environment"] = dict(self.environment)
        out["sources"] = dict(self.sources)
        out["notes"] = list(self.notes)
        return out

    def describe(self) -> str:
        """A human-readable summary, printed by `--dry-run`."""
        port = (
            self.main_process_port if self.main_process_port is not None else "a free port (chosen at launch)"
        )
        low, high = self.machine_count
        machines = f"{low}" if low == high else f"{low} to {high} (elastic: the group restarts at a new size)"
        total = (
            f"{self.num_processes}"
            if low == high
            else f"{self.num_processes} to {self.processes_per_machine * high}"
        )
        lines = [
            "Launch plan",
            f"  target        : {self.target.kind} {self.target.name} {shlex.join(self.target.args)}".rstrip(),
            f"  executor      : {_EXECUTORS[self.executor]}",
            f"  processes     : {total} in total, {self.processes_per_machine} on this machine "
            f"(global ranks {self.ranks.start}-{self.ranks.stop - 1}), device {self.device}",
            f"  machines      : {machines}; this is machine {self.machine_rank}",
            f"  rendezvous    : {self.rdzv_backend} at {self.main_process_ip}:{port}, run id {self.run_id!r}, "
            f"timeout {self.rdzv_timeout} s" + "".join(f", {k}={v}" for k, v in self.rdzv_conf),
            f"  failures      : checked every {self.monitor_interval:g} s; up to {self.max_restarts} restart(s) "
            "of the worker group",
            f"  signals       : SIGTERM/SIGUSR1 forwarded to the workers, killed {self.grace_period:g} s later; "
            + (
                f"exit code {self.preemption_exit_code} means preempted"
                if self.preemption_exit_code is not None
                else "the workers do not catch them (preemption_exit_code=None)"
            ),
            f"  worker command: {shlex.join([sys.executable, *self.worker_args()])}",
            "  settings      : "
            + (", ".join(f"{k}={v!r}" for k, v in self.flat_settings().items()) or "(defaults)"),
            "  environment   :",
        ]
        lines += [f"    {k}={v}" for k, v in self.environment] or ["    (nothing added)"]
        if self.sources:
            lines.append("  values from   : " + ", ".join(f"{k} ({s})" for k, s in self.sources))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_EXECUTORS = {
    "elastic": "torch elastic agent (torch.distributed.elastic LocalElasticAgent, as torchrun)",
    "xla": "torch_xla.launch (one process per local XLA device, PJRT runtime)",
}


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
    merged["num_machines"] = rules.machine_count(merged["num_machines"])
    rules.check_combinations(merged, "launch options")
    settings = _settings(merged, notes)
    _check_available(settings.get("strategy"), machine)
    device = _device(merged, settings, machine)
    rules.check_precision(settings.get("mixed_precision", "no"), device, "launch options")
    low, high = rules.machine_range(merged["num_machines"])
    num_processes = _num_processes(merged, device, machine, low, notes)
    environment = _environment(merged, settings, device, machine, num_processes // low, notes)
    environment.update(extra_env or {})
    executor: Executor = "xla" if device == "xla" else "elastic"
    _executor_notes(settings.get("strategy"), executor, high, notes)
    return LaunchPlan(
        target=target,
        num_processes=num_processes,
        num_machines=low,
        max_machines=high if high != low else None,
        machine_rank=int(merged["machine_rank"]),
        main_process_ip=str(merged.get("main_process_ip") or "127.0.0.1"),
        main_process_port=_port(merged, high),
        rdzv_backend=merged["rdzv_backend"],
        rdzv_timeout=int(merged["rdzv_timeout"]),
        rdzv_conf=tuple(rules.rdzv_settings(merged.get("rdzv_conf")).items()),
        run_id=f"distrib-{slurm.job_id}" if slurm and slurm.job_id else "distrib",
        max_restarts=int(merged["max_restarts"]),
        monitor_interval=float(merged["monitor_interval"]),
        grace_period=float(merged["grace_period"]),
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
    names = Settings.__dataclass_fields__
    flat = {k: v for k, v in values.items() if k.split(".")[0] in names and (k not in SECTIONS)}
    chosen = _codec.from_flat(flat, source="launch options")
    for section, cls in SECTIONS.items():
        fields = chosen.get(section)
        if fields is None:
            continue
        if section == "deepspeed" and isinstance(fields.get("config"), str):
            fields["config"] = _existing_file(fields["config"])
        _check_strategy_section(section, chosen, notes)
        chosen[section] = cls(**fields)
    Settings.from_mapping(chosen)
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


def _check_available(strategy: Any, machine: MachineFacts) -> None:
    if strategy in machine.unavailable:
        raise SettingsError(f"strategy {strategy!r} cannot run here: {machine.unavailable[strategy]}")


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
    """Processes at `num_machines` machines (the minimum of an elastic range)."""
    ids = _gpu_ids(values)
    available = len(ids) if ids else machine.gpu_count
    if "num_processes_per_machine" in values:
        total = int(values["num_processes_per_machine"]) * num_machines
    elif "num_processes" in values:
        total = int(values["num_processes"])
    else:
        total = num_machines * (available if device == "cuda" else 1)
    rules.check_processes(total, num_machines, "launch options")
    per_machine = total // num_machines
    if device == "cuda" and per_machine > available:
        raise SettingsError(
            f"launch options: {per_machine} processes on this machine, but it has {available} usable GPU(s). "
            f"Use --num-processes {available * num_machines}, or --cpu."
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
    env = _codec.to_environment(settings)
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


def _port(values: Mapping[str, Any], max_machines: int) -> int | None:
    port = values.get("main_process_port")
    if port is None and max_machines > 1:
        return DEFAULT_MULTI_MACHINE_PORT
    return None if port is None else int(port)


def _executor_notes(strategy: Any, executor: Executor, max_machines: int, notes: list[str]) -> None:
    if strategy == "deepspeed" and max_machines > 1:
        notes.append(
            "DeepSpeed runs under torch's elastic agent, like every other strategy: run this command on every "
            "machine (DeepSpeed's own pdsh/hostfile launcher is not used)."
        )
    if executor == "xla" and max_machines > 1:
        notes.append("XLA over several hosts: run this command on every host; PJRT finds the others itself.")


def grace_seconds(plan: LaunchPlan) -> int:
    """The grace period as torch's agent takes it (whole seconds, rounded up)."""
    return max(0, math.ceil(plan.grace_period))
