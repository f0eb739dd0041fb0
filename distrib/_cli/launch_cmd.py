"""`distrib launch` and `distrib test`: options + config file -> LaunchPlan -> executor."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from .. import _codec, _environment
from .._launch import accelerate_compat, config_file, machine
from .._launch.plan import LaunchPlan, Target, build_plan
from ..errors import LaunchError, SettingsError
from .options import SectionedCommand, launch_options, option, values_from_params

LAUNCH_HELP = """Run SCRIPT (or -m MODULE) on several processes, GPUs and machines.

\b
  distrib launch --num-processes 4 train.py --lr 3e-4
  distrib launch -m my_package.train --epochs 2
  distrib launch --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 train.py   # on machine 0
  distrib launch --num-machines 2 --machine-rank 1 --main-process-ip 10.0.0.1 train.py   # on machine 1
  distrib launch --num-machines 1:4 --rdzv-backend c10d --main-process-ip 10.0.0.1 train.py  # elastic
  srun --ntasks-per-node=1 distrib launch --num-processes 16 train.py   # SLURM: ranks, count, address

Everything after SCRIPT goes to the script. Each option can also be set in the config file (key in
[config: ...]; see `distrib config`); the command line wins over the file. The plan (processes,
rendezvous, environment) is printed by --dry-run. Accelerate's spellings of the flags work too
(--num_processes, --mixed_precision, --main_process_port, ...; --multi_gpu, --use_fsdp, --use_deepspeed,
--fsdp_sharding_strategy, --offload_param_device, ...; see docs/how-to/coming-from-accelerate.md).

\b
Processes are started by torch's elastic agent (as torchrun does). Every worker gets:
  RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK (= machine rank),
  MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_ERROR_FILE  (set by torch)
  DISTRIB_<SETTING> for each training setting chosen (DISTRIB_MIXED_PRECISION=bf16, ...;
  FSDP and DeepSpeed options as JSON in DISTRIB_FSDP / DISTRIB_DEEPSPEED), read by distributed()
  DISTRIB_DIAGNOSTICS_DIR: a directory per attempt for stall dumps and exit records (kept on failure)
  DISTRIB_LAUNCHER_PID, DISTRIB_GRACE_PERIOD: a worker dies with its launcher, even after a SIGKILL
  OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES and your --env KEY=VALUE pairs
Under srun, the machine count, machine rank and main address come from SLURM_STEP_NUM_NODES,
SLURM_NODEID and SLURM_STEP_NODELIST unless given.

\b
Failures: the workers are checked every --monitor-interval seconds. When one exits non-zero, the others
are stopped within seconds, and the launcher prints which rank on which machine failed first, its exit
code or signal and its Python traceback (no decorator needed), then exits with the worker's exit code
(128 + signal number for a signal: 137 for a SIGKILL the launcher did not send, e.g. the OOM killer).
When the failed ranks only waited for a peer, the report blames the rank they waited for: one that
exited early, or one still running elsewhere (stuck at FILE:LINE, from its stack), and prints the stall
watchdog's merged diagnosis (see --stall-timeout). --max-restarts N restarts the whole group up to N times
first, unless an attempt fails at the same optimizer step as the one before ("crash loop at step N").
Usage errors (bad flags or values, missing script or module, port in use) exit with code 2.

\b
Signals and preemption: SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 sent to the launcher are forwarded
to every worker, which get --grace-period seconds to save and exit before they are killed. Workers that
save and exit with the preemption exit code (75, EX_TEMPFAIL; setting preemption_exit_code) make the
launcher exit with that code too, meaning "preempted, run the same command again"; it is never counted
as a crash or restarted.
"""

#: Accelerate's strategy switches (hidden): flag -> strategy
ACCELERATE_SWITCHES = {
    "--multi_gpu": "ddp",
    "--use_fsdp": "fsdp",
    "--use_deepspeed": "deepspeed",
    "--tpu": "xla",
}
#: Accelerate's flags that change nothing under distrib (accepted, hidden)
ACCELERATE_NO_OPS = ("--same_network", "--debug")


def control_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options that steer the launcher itself rather than the run."""
    section = "Launch control"
    decorators = [
        option(
            "--config-file",
            type=click.Path(dir_okay=False),
            section=section,
            help="Config file to read (default: the one `distrib config` wrote, if any).",
        ),
        option(
            "--env",
            "env_pairs",
            multiple=True,
            metavar="KEY=VALUE",
            section=section,
            help="Set an environment variable in every worker (repeatable).",
        ),
        option(
            "--dry-run",
            is_flag=True,
            section=section,
            help="Print the resolved plan (processes, rendezvous, environment) and exit 0.",
        ),
        option(
            "-q",
            "--quiet",
            is_flag=True,
            section=section,
            help="Print only the workers' output and failure reports.",
        ),
    ]
    for name, strategy in ACCELERATE_SWITCHES.items():
        decorators.append(
            click.option(name, "switch_" + name[2:], is_flag=True, hidden=True, help=f"--strategy {strategy}")
        )
    for flag in accelerate_compat.LAUNCH_FLAGS:  # Accelerate's value-taking flags, translated like its config
        decorators.append(click.option(f"--{flag}", "accelerate_" + flag, hidden=True, metavar="VALUE"))
    for flag in ACCELERATE_NO_OPS:
        decorators.append(click.option(flag, "ignored_" + flag[2:], is_flag=True, hidden=True))
    decorators.append(click.option("--dynamo_backend", "dynamo_backend", hidden=True, metavar="BACKEND"))
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def parse_env_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise click.BadParameter(
                f"{pair!r} is not KEY=VALUE with a valid variable name.", param_hint="--env"
            )
        out[name] = value
    return out


def check_dynamo(params: Mapping[str, Any], values: dict[str, Any]) -> None:
    """Accelerate's `--dynamo_backend BACKEND` is the `compile` setting with that backend (`no`: none)."""
    chosen = accelerate_compat.compile_options(params.get("dynamo_backend"))
    if chosen is not None and "compile" not in values:
        values["compile"] = chosen


def switched_strategy(params: Mapping[str, Any], values: dict[str, Any]) -> None:
    """Apply Accelerate's --multi_gpu / --use_fsdp / --use_deepspeed as --strategy, refusing conflicts."""
    chosen = [
        (flag, strategy) for flag, strategy in ACCELERATE_SWITCHES.items() if params.get("switch_" + flag[2:])
    ]
    strategies = {strategy for _, strategy in chosen} | (
        {values["strategy"]} if "strategy" in values else set()
    )
    if len(strategies) > 1:
        given = ", ".join(flag for flag, _ in chosen) + (
            f", --strategy {values['strategy']}" if "strategy" in values else ""
        )
        raise SettingsError(f"{given} ask for different strategies; give only one (--strategy NAME).")
    if chosen:
        values["strategy"] = chosen[0][1]


def accelerate_flags(params: Mapping[str, Any], values: dict[str, Any]) -> list[str]:
    """Add Accelerate's value-taking flags (`--fsdp_sharding_strategy FULL_SHARD`, ...) to the command-line
    values, translated as in an Accelerate config; return the warnings for the ones that do not map."""
    given = {
        k: params[f"accelerate_{k}"]
        for k in accelerate_compat.LAUNCH_FLAGS
        if params.get(f"accelerate_{k}") is not None
    }
    if not given:
        return []
    nested, warnings = accelerate_compat.translate_flags(given)
    for key, value in _codec.to_flat(nested).items():
        if key in values and values[key] != value:
            raise SettingsError(
                f"--{key.replace('.', '-')} and Accelerate's flags give {key} two values; keep one of them."
            )
        values[key] = value
    return warnings


def make_plan(params: dict[str, Any], target: Target) -> LaunchPlan:
    """Config file, then command line, into a plan; `SettingsError` becomes a usage error (exit 2)."""
    try:
        found = config_file.load_effective(params.get("config_file"))
        cli_values = values_from_params(params)
        switched_strategy(params, cli_values)
        check_dynamo(params, cli_values)
        flag_warnings = accelerate_flags(params, cli_values)
        values = {**found.values, **cli_values}
        sources = {k: "file" for k in found.values} | {k: "command line" for k in cli_values}
        env = {**found.env, **parse_env_pairs(params.get("env_pairs") or ())}
        if not params.get("quiet"):
            for warning in [*found.warnings, *flag_warnings]:
                click.echo(f"warning: {warning}", err=True)
        _check_module(target, env)
        facts = machine.detect(
            need_gpus=not values.get("cpu") and values.get("strategy") != "xla",
            strategy=values.get("strategy"),
        )
        plan = build_plan(
            values,
            target=target,
            machine=facts,
            slurm=_environment.slurm_step(),
            extra_env=env,
            sources=sources,
        )
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    if plan.machine_rank == 0 and plan.main_process_port is not None and plan.executor == "elastic":
        from .._launch.executor import port_in_use

        if port_in_use(plan.main_process_port):
            raise click.UsageError(
                f"port {plan.main_process_port} is already in use on this machine (another distrib or torchrun "
                "job?). Choose another with --main-process-port, or stop the other job."
            )
    return plan


def _check_module(target: Target, env: Mapping[str, str]) -> None:
    """A `-m` module the workers could not find is refused before anything starts (as `python -m` would
    fail in every worker), looked up the way they will: from this directory, then PYTHONPATH."""
    if target.kind != "module":
        return
    pythonpath = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    search = [os.getcwd(), *[p for p in pythonpath.split(os.pathsep) if p], *sys.path[1:]]
    if not machine.module_exists(target.name, search):
        raise SettingsError(
            f"module {target.name!r} (-m) not found: `python -m {target.name}` would fail in every worker. "
            f"It is looked up from this directory ({os.getcwd()}), then PYTHONPATH and the installed packages; "
            "check the name, run from the project's root, or give a script path instead of -m."
        )


def execute(plan: LaunchPlan, *, quiet: bool) -> int:
    """Run the plan; return the exit code (0, the first failed worker's, or the preemption code)."""
    from .._launch import executor

    if not quiet:
        click.echo(
            f"distrib: starting {plan.processes_per_machine} process(es) on machine {plan.machine_rank} of "
            f"{_machines(plan)} ({plan.num_processes} in total, {plan.device})",
            err=True,
        )
    try:
        if plan.executor == "xla":
            executor.run_xla(plan)
        else:
            executor.run_elastic(plan, quiet=quiet)
    except executor.WorkersFailed as exc:
        click.echo(str(exc), err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("distrib: interrupted; workers stopped.", err=True)
        return 130
    except LaunchError as exc:
        click.echo(f"distrib: {exc}", err=True)
        return 1
    except Exception as exc:
        click.echo(
            f"distrib: the launch failed before the workers could run: {type(exc).__name__}: {exc}", err=True
        )
        return 1
    return 0


def _machines(plan: LaunchPlan) -> str:
    low, high = plan.machine_count
    return str(low) if low == high else f"{low} to {high}"


def script_target(target: str, args: tuple[str, ...], is_module: bool) -> Target:
    if is_module:
        return Target(target, "module", args)
    if not Path(target).is_file():
        raise click.BadParameter(
            f"script {target!r} not found. Give the path of a Python file, or -m package.module for a module.",
            param_hint="SCRIPT",
        )
    return Target(target, "script", args)


@click.command(
    "launch",
    cls=SectionedCommand,
    help=LAUNCH_HELP,
    context_settings={"allow_interspersed_args": False, "max_content_width": 110},
)
@launch_options
@control_options
@option(
    "-m",
    "--module",
    "is_module",
    is_flag=True,
    section="Launch control",
    help="SCRIPT is a module name, run as `python -m SCRIPT`.",
)
@click.argument("script", metavar="SCRIPT")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[SCRIPT_ARGS]...")
@click.pass_context
def launch(
    ctx: click.Context, script: str, script_args: tuple[str, ...], is_module: bool, **params: Any
) -> None:
    plan = make_plan(params, script_target(script, script_args, is_module))
    if params["dry_run"]:
        click.echo(plan.describe())
        return
    ctx.exit(execute(plan, quiet=params["quiet"]))


SANITY_SCRIPT = Path(__file__).parent.parent / "_launch" / "sanity.py"
TEST_HELP = """Check that this setup works: launch a bundled sanity script with your config and flags.

\b
  distrib test                       # with the default config file
  distrib test --num-processes 2 --cpu

It checks, on the real processes: the process group is up; every rank sees the right rank, world size
and device; gather/reduce/broadcast return the right values; the shards of a prepared dataloader cover
the dataset exactly once; a few training steps give the same weights as one process; mixed precision
runs. It prints a report and exits 0 when every check passes, 1 otherwise.
"""


@click.command("test", cls=SectionedCommand, help=TEST_HELP, context_settings={"max_content_width": 110})
@launch_options
@control_options
@click.pass_context
def test(ctx: click.Context, **params: Any) -> None:
    plan = make_plan(params, Target(str(SANITY_SCRIPT), "script"))
    args = ("--expected-world-size", str(plan.num_processes), "--expected-machines", str(plan.num_machines))
    plan = dataclasses.replace(plan, target=Target(str(SANITY_SCRIPT), "script", args))
    if params["dry_run"]:
        click.echo(plan.describe())
        return
    code = execute(plan, quiet=params["quiet"])
    click.echo("distrib test: " + ("PASSED" if code == 0 else f"FAILED (exit code {code})"), err=True)
    ctx.exit(0 if code == 0 else 1)
