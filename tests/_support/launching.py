"""Helpers of the tests that run `python -m distrib launch` for real: a clean environment, scripts written
into the test's directory, and the whole output of a launch for assertion messages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

TIMEOUT = 240


def distrib_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without distrib's, SLURM's or OpenMP's variables, and no config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTRIB_", "SLURM_", "OMP_NUM_THREADS"))}
    env["DISTRIB_CONFIG_DIR"] = str(tmp_path / "no-config")
    env["TMPDIR"] = str(tmp_path)  # the diagnostics a failed launch keeps stay in the test's directory
    env.update(extra)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "distrib", *args]


def run(tmp_path: Path, *args: str, timeout: float = TIMEOUT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        cwd=tmp_path,
        env=distrib_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(tmp_path: Path, *args: str, output: str = "out.txt", **env: str) -> subprocess.Popen[bytes]:
    """Start `distrib launch ...` in the background, its stdout and stderr going to `output`."""
    handle = open(tmp_path / output, "wb")  # noqa: SIM115 - the child keeps writing to it
    return subprocess.Popen(
        command(*args),
        cwd=tmp_path,
        env=distrib_env(tmp_path, **env),
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def finish(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> int:
    """Wait for a background launch; kill it (and say so) when it does not end in time."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the launch did not end within {timeout:.0f} s") from None


def shown(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def script(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / name).write_text(textwrap.dedent(body))
    return name


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
