"""The one place where distrib reads environment variables.

How the process was started is detected from, in order:

* torchrun / `distrib launch` / any torch elastic agent: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
  `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`;
* SLURM under `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NODEID`, `SLURM_NNODES`,
  with the first host of `SLURM_STEP_NODELIST` (or `MASTER_ADDR`) as the rendezvous address;
* MPI launchers: `OMPI_COMM_WORLD_*` (Open MPI) or `PMI_RANK`/`PMI_SIZE` with `MPI_LOCALRANKID`
  (MPICH, Intel MPI), with `MASTER_ADDR`/`MASTER_PORT` (default 127.0.0.1:29500 on one machine);
* otherwise a plain `python script.py`: one process.

Settings chosen by the launcher arrive as `DISTRIB_<SETTING>` variables, one per `Settings` field
(`DISTRIB_MIXED_PRECISION=bf16`, `DISTRIB_GRADIENT_ACCUMULATION_STEPS=4`, ...); the per-strategy option
objects travel as JSON (`DISTRIB_FSDP='{"sharding": "grad_op"}'`); `_codec.py` writes and reads their
text. (Three more variables pass from `distrib launch` to its worker bootstrap, which must read them
before anything but the standard library is imported: `DISTRIB_DIAGNOSTICS_DIR`, `DISTRIB_LAUNCHER_PID`
and `DISTRIB_GRACE_PERIOD`, in `_launch/records.py`.) `DISTRIB_CONFIG_DIR` and
`XDG_CONFIG_HOME` locate the config file. The launcher (`distrib launch`) also reads, through
`slurm_step` and `omp_num_threads`, the SLURM step variables (`SLURM_STEP_NUM_NODES`, `SLURM_NODEID`,
`SLURM_STEP_NUM_TASKS`, `SLURM_STEP_NODELIST`, `SLURM_JOB_ID`) and an exported `OMP_NUM_THREADS`.
The stall watchdog writes its dumps into `DISTRIB_DIAGNOSTICS_DIR` (set per attempt by `distrib launch`);
the DeepSpeed build-lock check honours torch's `TORCH_EXTENSIONS_DIR`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import _codec, _validation
from ._settings import Settings
from .errors import SettingsError

Launcher = Literal["python", "torchrun", "slurm", "mpi"]
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class ProcessEnvironment:
    """Where this process sits in the job, as read from the environment."""

    launcher: Launcher = "python"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launcher_settings: Mapping[str, Any] = field(default_factory=dict)
    restart_count: int = 0
    # torchrun's agent hosts the job's store at MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE)
    agent_store: bool = False


def read_environment(environ: Mapping[str, str] | None = None) -> ProcessEnvironment:
    """Read rank, world size, rendezvous address and launcher settings from the environment."""
    env = os.environ if environ is None else environ
    settings = launcher_settings(env)
    for reader in (_from_torchrun, _from_slurm, _from_mpi):
        found = reader(env)
        if found is not None:
            return dataclasses.replace(found, launcher_settings=settings)
    return ProcessEnvironment(launcher_settings=settings)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise SettingsError(f"the environment variable {name} is required by this launcher but not set.")
        return default
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"the environment variable {name}={value!r} must be an integer.") from None


def _port(env: Mapping[str, str]) -> int:
    return _int(env, "MASTER_PORT", DEFAULT_PORT)


def _from_torchrun(env: Mapping[str, str]) -> ProcessEnvironment | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world_size = _int(env, "WORLD_SIZE")
    local_world_size = _int(env, "LOCAL_WORLD_SIZE", world_size)
    return ProcessEnvironment(
        launcher="torchrun",
        rank=_int(env, "RANK"),
        local_rank=_int(env, "LOCAL_RANK", 0),
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=_int(env, "GROUP_RANK", 0),
        num_nodes=_int(env, "GROUP_WORLD_SIZE", max(1, world_size // max(1, local_world_size))),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port(env),
        restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def _from_slurm(env: Mapping[str, str]) -> ProcessEnvironment | None:
    if "SLURM_PROCID" not in env or _int(env, "SLURM_NTASKS", 1) < 2:
        return None
    world_size = _int(env, "SLURM_NTASKS")
    num_nodes = _int(env, "SLURM_NNODES", 1)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    return ProcessEnvironment(
        launcher="slurm",
        rank=_int(env, "SLURM_PROCID"),
        local_rank=_int(env, "SLURM_LOCALID", 0),
        world_size=world_size,
        local_world_size=max(1, world_size // num_nodes),
        node_rank=_int(env, "SLURM_NODEID", 0),
        num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist) or "127.0.0.1",
        master_port=_port(env),
    )


def _from_mpi(env: Mapping[str, str]) -> ProcessEnvironment | None:
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, world_size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
        local_world_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world_size)
    elif "PMI_RANK" in env:
        rank, world_size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_rank = _int(env, "MPI_LOCALRANKID", 0)
        local_world_size = _int(env, "MPI_LOCALNRANKS", world_size)
    else:
        return None
    if world_size < 2:
        return None
    num_nodes = max(1, world_size // max(1, local_world_size))
    if num_nodes > 1 and "MASTER_ADDR" not in env:
        raise SettingsError(
            "an MPI launch over several machines needs MASTER_ADDR (the address of rank 0's machine); "
            "export it to every rank, e.g. mpirun -x MASTER_ADDR=node0 ..."
        )
    return ProcessEnvironment(
        launcher="mpi",
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=rank // max(1, local_world_size),
        num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port(env),
    )


def first_slurm_host(nodelist: str) -> str | None:
    """The first host of a SLURM node list such as `gpu[03-05,07],cpu1` (here: `gpu03`)."""
    match = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        return None
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """Typed `Settings` values found in `DISTRIB_<FIELD>` variables (decoded by `_codec`)."""
    return _codec.from_environment(environ)


def resolve_settings(code: Mapping[str, Any], environ: ProcessEnvironment) -> tuple[Settings, list[str]]:
    """Merge code and launcher values (code wins); return the settings and one message per conflict.

    Option objects (`fsdp=`, `deepspeed=`, ...) merge field by field: the fields the code sets win, the
    launcher's others stay, so `DeepSpeedOptions(gradient_clipping=1.0)` in code keeps `--zero-stage 3`.
    """
    merged = dict(environ.launcher_settings)
    conflicts: list[str] = []
    for name, value in code.items():
        launched = merged.get(name)
        if dataclasses.is_dataclass(launched) and not isinstance(launched, type):
            value = _merge_options(name, launched, value, conflicts)
        elif name in merged and launched != value:
            conflicts.append(_conflict(name, value, launched))
        merged[name] = value
    return Settings.from_mapping(merged), conflicts


def _merge_options(name: str, launched: Any, code: Any, conflicts: list[str]) -> Any:
    given = _codec.section_fields(name, code, source="distributed()")
    defaults = type(launched)()
    for key, value in given.items():
        old = getattr(launched, key, value)
        if old != value and old != getattr(defaults, key, None):
            conflicts.append(_conflict(f"{name}.{key}", value, old))
    current = {f.name: getattr(launched, f.name) for f in dataclasses.fields(launched)}
    return _validation.build(type(launched), {**current, **given}, owner=type(launched).__name__)


def _conflict(name: str, code: Any, launcher: Any) -> str:
    variable = _codec.variable(name)
    return (
        f"setting {name!r}: the code asks for {code!r} but the launcher set {launcher!r} ({variable}); "
        "using the code's value. Remove one of them to silence this."
    )


def config_directory(environ: Mapping[str, str] | None = None) -> Path:
    """Where the config file lives: $DISTRIB_CONFIG_DIR, else $XDG_CONFIG_HOME/distrib, else ~/.config/distrib."""
    env = os.environ if environ is None else environ
    if env.get("DISTRIB_CONFIG_DIR"):
        return Path(env["DISTRIB_CONFIG_DIR"])
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]) / "distrib"
    return Path(env.get("HOME", str(Path.home()))) / ".config" / "distrib"


def config_directory_origin(environ: Mapping[str, str] | None = None) -> str:
    """Which rule `config_directory` followed: "$DISTRIB_CONFIG_DIR", "$XDG_CONFIG_HOME" or "home"."""
    env = os.environ if environ is None else environ
    if env.get("DISTRIB_CONFIG_DIR"):
        return "$DISTRIB_CONFIG_DIR"
    return "$XDG_CONFIG_HOME" if env.get("XDG_CONFIG_HOME") else "home"


@dataclass(frozen=True)
class SlurmStep:
    """What `distrib launch` needs from a SLURM step (`srun distrib launch ...`, one task per node)."""

    node_rank: int
    num_nodes: int
    num_tasks: int
    main_address: str | None
    job_id: str | None


def slurm_step(environ: Mapping[str, str] | None = None) -> SlurmStep | None:
    """The SLURM step this process runs in (inside `srun`), or None outside one (also in a batch script)."""
    env = os.environ if environ is None else environ
    if "SLURM_STEP_NUM_NODES" not in env or "SLURM_NODEID" not in env:
        return None
    num_nodes = _int(env, "SLURM_STEP_NUM_NODES")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    return SlurmStep(
        node_rank=_int(env, "SLURM_NODEID"),
        num_nodes=num_nodes,
        num_tasks=_int(env, "SLURM_STEP_NUM_TASKS", num_nodes),
        main_address=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
        job_id=env.get("SLURM_JOB_ID"),
    )


def omp_num_threads(environ: Mapping[str, str] | None = None) -> str | None:
    """The `OMP_NUM_THREADS` value, if set (the launcher keeps a value the user exported)."""
    env = os.environ if environ is None else environ
    return env.get("OMP_NUM_THREADS")


def diagnostics_directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where each rank writes its stall dump: `$DISTRIB_DIAGNOSTICS_DIR` (set by `distrib launch` for each
    attempt), or None (the dump then goes to stderr)."""
    env = os.environ if environ is None else environ
    value = env.get("DISTRIB_DIAGNOSTICS_DIR")
    return Path(value) if value else None


def torch_extensions_directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """`$TORCH_EXTENSIONS_DIR`, where torch builds JIT extensions when it is set."""
    env = os.environ if environ is None else environ
    value = env.get("TORCH_EXTENSIONS_DIR")
    return Path(value) if value else None
