"""`debug_launcher` and `notebook_launcher`: functions on real CPU processes through the elastic agent,
from a script, from `python - < script.py` and from `python -c`."""

from __future__ import annotations

import os
import signal
import tempfile

import pytest
import torch

import distrib
from distrib.errors import LaunchError, SettingsError

pytestmark = pytest.mark.slow


def _describe(scale: int) -> tuple[int, int, str, str, float]:
    with distrib.distributed() as ctx:
        total = distrib.reduce(torch.tensor([float(ctx.rank + 1)]), "sum").item()
        return ctx.rank, ctx.world_size * scale, ctx.mixed_precision, os.environ.get("EXTRA", ""), total


def _fail_on_rank_1() -> None:
    with distrib.distributed() as ctx:
        if ctx.rank == 1:
            raise ValueError("rank 1 refuses")
        distrib.wait_for_everyone()


def test_notebook_launcher_returns_every_rank_result_with_settings_and_environment():
    before = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    results = distrib.notebook_launcher(
        _describe, args=(10,), num_processes=2, cpu=True, mixed_precision="bf16", env={"EXTRA": "x"}
    )
    assert results == [(0, 20, "bf16", "x", 3.0), (1, 20, "bf16", "x", 3.0)]
    assert dict(os.environ) == before  # nothing leaks into the caller's environment
    # torch's agent installs handlers that raise in the caller; a notebook gets its own back
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_the_first_failure_is_raised_with_its_rank_and_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the kept diagnostics go
    with pytest.raises(LaunchError) as info:
        distrib.debug_launcher(_fail_on_rank_1, num_processes=2)  # CPU, gloo
    message = str(info.value)
    assert message.startswith("distrib: rank 1 (local rank 1) on machine 0"), message
    assert "ValueError: rank 1 refuses" in message
    assert 'raise ValueError("rank 1 refuses")' in message
    assert f"Diagnostics of this run are kept in {tmp_path}" in message


def test_bad_arguments_are_refused_before_any_process_starts():
    with pytest.raises(SettingsError, match="unknown key 'mixed_precison'"):
        distrib.notebook_launcher(_describe, num_processes=2, cpu=True, mixed_precison="bf16")
    with pytest.raises(SettingsError, match="needs a GPU"):
        distrib.notebook_launcher(_describe, num_processes=2, cpu=True, mixed_precision="fp8")


STDIN_SCRIPT = """
import os
import torch
import distrib

def describe(scale):
    with distrib.distributed() as ctx:
        return ctx.rank * scale, ctx.world_size

if __name__ == "__main__":
    print("RESULT", distrib.notebook_launcher(describe, args=(10,), num_processes=2, cpu=True), flush=True)
"""


@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_notebook_launcher_works_from_a_main_module_without_a_file(tmp_path, how: str):
    # `python - < script.py` (and `python -c`) leave no file that spawn could re-run: fork is used
    import subprocess
    import sys

    from tests._support.launching import distrib_env

    args = [sys.executable, "-"] if how == "stdin" else [sys.executable, "-c", STDIN_SCRIPT]
    result = subprocess.run(
        args,
        input=STDIN_SCRIPT if how == "stdin" else None,
        cwd=tmp_path,
        env=distrib_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT [(0, 2), (10, 2)]" in result.stdout, result.stdout + result.stderr
