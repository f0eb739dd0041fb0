"""`distrib env`: what a bug report needs, in one block to paste."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .._launch import config_file
from .._version import __version__
from ..errors import SettingsError

OPTIONAL_PACKAGES = (
    "deepspeed",
    "torch_xla",
    "torchao",
    "transformers",
    "accelerate",
    "safetensors",
    "numpy",
)


def package_version(name: str) -> str | None:
    """The installed version of a distribution, without importing it."""
    import importlib.metadata

    for candidate in (name, name.replace("_", "-")):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def torch_facts() -> dict[str, Any]:
    """torch's version and what it can use here (imports torch)."""
    import torch
    import torch.distributed as dist

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "none (CPU build)",
        "CUDA available": torch.cuda.is_available(),
        "gloo available": dist.is_available() and dist.is_gloo_available(),
        "NCCL available": dist.is_available() and dist.is_nccl_available(),
        "MPI available": dist.is_available() and dist.is_mpi_available(),
    }
    if torch.cuda.is_available():
        facts["GPUs"] = "; ".join(
            f"{i}: {torch.cuda.get_device_name(i)} "
            f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())
        )
        facts["bf16 on GPU"] = torch.cuda.is_bf16_supported()
    return facts


def report() -> list[tuple[str, Any]]:
    import platform

    from .._launch.machine import cpu_count

    rows: list[tuple[str, Any]] = [
        ("distrib", __version__),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("OS", f"{platform.platform()}"),
        ("CPU", f"{platform.machine()} {platform.processor() or ''}".strip()),
        ("CPU cores usable", f"{cpu_count()} of {os.cpu_count()}"),
    ]
    rows += list(torch_facts().items())
    rows += [(name, package_version(name) or "not installed") for name in OPTIONAL_PACKAGES]
    return rows + _config_rows()


def _config_rows() -> list[tuple[str, Any]]:
    try:
        found = config_file.load_effective(None)
    except SettingsError as exc:
        return [("config file", f"{config_file.default_path()} (INVALID: {exc})")]
    if found.path is None:
        return [("config file", f"none ({config_file.default_path()} does not exist)")]
    values = ", ".join(f"{k}={v!r}" for k, v in found.values.items()) or "(empty)"
    return [("config file", f"{found.path} ({found.origin})"), ("config values", values)]


@click.command("env")
def env() -> None:
    """Print versions, hardware and the effective config file, for bug reports."""
    click.echo("Copy this into your bug report:\n")
    for name, value in report():
        click.echo(f"- {name}: {value}")
