"""`distrib config`: a questionnaire that writes the config file; `--default`; `config show`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from .. import _validation
from .._launch import config_file, rules
from .._launch.options import LAUNCH_DEFAULTS, RdzvBackend
from .._options import DeepSpeedOptions, FSDPOptions
from .._settings import Settings, choices
from ..errors import SettingsError
from .options import LiteralChoice


def _target_path(path: str | None) -> Path:
    return Path(path).expanduser() if path else config_file.default_path()


def _gpu_count() -> int:
    from .._launch.machine import gpu_count

    return gpu_count()


@click.group("config", invoke_without_command=True)
@click.option(
    "--config-file",
    "path_option",
    type=click.Path(dir_okay=False),
    help="Where to write (default: the default location).",
)
@click.option(
    "--default", "write_default", is_flag=True, help="Write a default config for this machine, no questions."
)
@click.option("--force", is_flag=True, help="With --default: overwrite an existing file.")
@click.pass_context
def config(ctx: click.Context, path_option: str | None, write_default: bool, force: bool) -> None:
    """Write the config file that `distrib launch` and `distrib test` read.

    \b
    distrib config                    ask questions (Enter keeps the default shown)
    distrib config --default          non-interactive default for this machine
    distrib config show               print the effective config and where it came from

    The default location is $DISTRIB_CONFIG_DIR, else $XDG_CONFIG_HOME/distrib, else ~/.config/distrib;
    the file is default_config.yaml (schema `version: 1`).
    """
    if ctx.invoked_subcommand is not None:
        return
    path = _target_path(path_option)
    if write_default:
        if path.exists() and not force:
            raise click.UsageError(f"{path} already exists; pass --force to overwrite it, or edit it.")
        values = default_values(_gpu_count())
    else:
        if path.exists() and not click.confirm(f"{path} exists. Overwrite it?", default=False):
            raise click.Abort()
        values = questionnaire(_gpu_count())
    try:
        config_file.write(path, values)
    except SettingsError as exc:  # pragma: no cover - every answer was validated
        raise click.UsageError(str(exc)) from None
    click.echo(f"Wrote {path}")


def default_values(gpu_count: int) -> dict[str, Any]:
    """The non-interactive default: one process per GPU, else one CPU process."""
    if gpu_count == 0:
        return {"num_processes": 1, "cpu": True, "mixed_precision": "no"}
    return {"num_processes": gpu_count, "mixed_precision": "no"}


def questionnaire(gpu_count: int) -> dict[str, Any]:
    """Ask for every common setting; each answer is validated before the next question."""
    values: dict[str, Any] = {}
    _ask_machines(values)
    _ask_processes(values, gpu_count)
    _ask_training(values)
    if values["strategy"] == "fsdp":
        _ask_fsdp(values)
    elif values["strategy"] == "deepspeed":
        _ask_deepspeed(values)
    return values


def _ask_machines(values: dict[str, Any]) -> None:
    values["num_machines"] = n = click.prompt("How many machines?", type=click.IntRange(1), default=1)
    if n == 1:
        return
    values["machine_rank"] = click.prompt(
        f"Rank of this machine (0 to {n - 1})?", type=click.IntRange(0, n - 1), default=0
    )
    values["main_process_ip"] = click.prompt("Address of machine 0 (reachable from every machine)?", type=str)
    values["main_process_port"] = click.prompt(
        "Rendezvous port on machine 0?", type=click.IntRange(1, 65535), default=29500
    )
    values["rdzv_backend"] = click.prompt(
        "Rendezvous backend?",
        type=LiteralChoice(_validation.literal_values(RdzvBackend)),
        default=LAUNCH_DEFAULTS["rdzv_backend"],
    )


def _ask_processes(values: dict[str, Any], gpu_count: int) -> None:
    cpu = click.confirm("Run on CPU only?", default=gpu_count == 0)
    if cpu:
        values["cpu"] = True
    n = values["num_machines"]
    per_machine = 1 if cpu or gpu_count == 0 else gpu_count

    def multiple_of_machines(text: str) -> int:
        value = int(click.IntRange(1).convert(text, None, None))  # type: ignore[arg-type]
        try:
            rules.check_processes(value, n, "answer")
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None
        return value

    values["num_processes"] = click.prompt(
        f"How many processes in total, over all {n} machine(s)?",
        default=n * per_machine,
        value_proc=multiple_of_machines,
    )
    if not cpu and gpu_count:
        ids = click.prompt(
            "Which GPUs should this machine use (e.g. 0,1)?", default="all", value_proc=_gpu_ids_answer
        )
        if ids != "all":
            values["gpu_ids"] = ids


def _gpu_ids_answer(text: str) -> str:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if text.strip().lower() != "all" and (not ids or not all(part.isdigit() for part in ids)):
        raise click.UsageError(f"{text!r} is not a list of GPU numbers like 0,1 (or all).")
    return "all" if text.strip().lower() == "all" else ",".join(ids)


def _ask_training(values: dict[str, Any]) -> None:
    values["strategy"] = click.prompt("Strategy?", type=LiteralChoice(choices("strategy")), default="auto")

    def precision(text: str) -> str:
        value = str(LiteralChoice(choices("mixed_precision")).convert(text, None, None))
        try:
            rules.check_precision(value, "cpu" if values.get("cpu") else "cuda", "answer")
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None
        return value

    values["mixed_precision"] = click.prompt(
        f"Mixed precision ({', '.join(choices('mixed_precision'))})?",
        default=Settings().mixed_precision,
        value_proc=precision,
    )
    values["gradient_accumulation_steps"] = click.prompt(
        "Gradient accumulation steps?", type=click.IntRange(1), default=1
    )


def _ask_fsdp(values: dict[str, Any]) -> None:
    sharding = _validation.literal_values(_validation.field_types(FSDPOptions)["sharding"])
    values["fsdp.sharding"] = click.prompt("FSDP sharding?", type=LiteralChoice(sharding), default="full")
    values["fsdp.cpu_offload"] = click.confirm("Offload parameters to CPU?", default=False)
    values["fsdp.activation_checkpointing"] = click.confirm("Activation checkpointing?", default=False)


def _ask_deepspeed(values: dict[str, Any]) -> None:
    """The ZeRO stage first (every DeepSpeed run has one), then the optional JSON config, which must exist;
    offloads only where the stage allows them."""
    stages = _validation.literal_values(_validation.field_types(DeepSpeedOptions)["zero_stage"])
    stage = values["deepspeed.zero_stage"] = click.prompt(
        "ZeRO stage?", type=LiteralChoice(stages), default=2
    )
    path = click.prompt(
        "DeepSpeed JSON config file (empty: none, distrib builds the config)?",
        default="",
        show_default=False,
        value_proc=_existing_json_or_empty,
    )
    if path:
        values["deepspeed.config"] = path
    if stage != 0:
        values["deepspeed.offload_optimizer"] = click.confirm(
            "Offload optimizer state to CPU?", default=False
        )
    if stage == 3:
        values["deepspeed.offload_params"] = click.confirm("Offload parameters to CPU?", default=False)


def _existing_json_or_empty(text: str) -> str:
    """A prompt answer: empty, or the path of a readable JSON file (re-asked otherwise)."""
    if not text.strip():
        return ""
    path = Path(text.strip()).expanduser().resolve()
    if not path.is_file():
        raise click.UsageError(
            f"{path} does not exist; give the path of a DeepSpeed JSON config, or leave it empty."
        )
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise click.UsageError(
            f"{path} is not a readable JSON file ({exc}); fix it, or leave the answer empty."
        ) from None
    return str(path)


@config.command("show")
@click.option("--config-file", "path_option", type=click.Path(dir_okay=False), help="Show this file instead.")
def show(path_option: str | None) -> None:
    """Print the effective config: each value and whether it came from the file or the defaults."""
    try:
        found = config_file.load_effective(path_option)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    where = (
        f"{found.path} ({found.origin})"
        if found.path
        else f"none ({config_file.default_path()} does not exist)"
    )
    click.echo(f"config file: {where}")
    if found.format != "distrib":
        click.echo(f"format: {found.format} (translated to distrib's keys)")
    for warning in found.warnings:
        click.echo(f"warning: {warning}")
    for key, value, source in effective_rows(found.values):
        click.echo(f"  {key:<30} {value!r:<24} {source}")
    for name, value in found.env.items():
        click.echo(f"  env.{name:<26} {value!r:<24} file")


def effective_rows(values: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, "file" | "default") for the file's keys and the launch and settings defaults."""
    defaults: dict[str, Any] = {"num_processes": "auto (one per GPU, else 1)", **LAUNCH_DEFAULTS}
    settings = Settings()
    for name in ("strategy", "mixed_precision", "gradient_accumulation_steps", "cpu"):
        defaults[name] = getattr(settings, name)
    rows = [(k, v, "file") for k, v in values.items()]
    rows += [(k, v, "default") for k, v in defaults.items() if k not in values]
    return rows
