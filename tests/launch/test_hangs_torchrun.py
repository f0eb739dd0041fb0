"""Hangs and mismatches in scripts started by plain torchrun: the stall watchdog's merged diagnosis names
the rank that is not in the collective, and a skipped collective stops the run at once with a table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distrib._diagnosis import STALL_EXIT_CODE, merged_report
from distrib.testing import free_port

pytestmark = pytest.mark.slow

STUCK = """
    import time
    import torch
    from distrib import distributed, gather

    with distributed(stall_timeout=3) as ctx:
        gather(torch.ones(2))
        if ctx.rank == 1:
            time.sleep(600)  # stuck outside any collective
        gather(torch.ones(2))
"""

SKIPPED = """
    import torch
    from distrib import distributed, gather, wait_for_everyone

    with distributed(stall_timeout=60) as ctx:
        if ctx.rank == 0:
            gather(torch.ones(2))  # rank 1 skips this gather
        wait_for_everyone()
"""


def _torchrun(
    tmp_path: Path, body: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "train.py").write_text(textwrap.dedent(body))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIB_")}
    environ.update({"OMP_NUM_THREADS": "1", **(env or {})})
    args = ["--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}", "train.py"]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _shown(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def test_under_torchrun_rank_0_prints_the_merged_diagnosis(tmp_path):
    result = _torchrun(tmp_path, STUCK)
    assert result.returncode != 0, _shown(result)
    assert re.search(r"rank 1 is NOT in that collective: stuck at \S*train.py:9 ", result.stderr), _shown(
        result
    )
    assert re.search(r"rank 0 waits in collective #2: gather\(\) at \S*train.py:10", result.stderr), _shown(
        result
    )
    assert f"exitcode  : {STALL_EXIT_CODE}" in result.stderr or str(STALL_EXIT_CODE) in result.stderr


def test_with_a_diagnostics_directory_the_dumps_go_there(tmp_path):
    directory = tmp_path / "diagnostics"
    result = _torchrun(tmp_path, STUCK, {"DISTRIB_DIAGNOSTICS_DIR": str(directory)})
    assert result.returncode != 0, _shown(result)
    report = merged_report(directory)
    assert report is not None and re.search(
        r"rank 1 is NOT in that collective: stuck at \S*train.py:9 ", report
    ), report or _shown(result)


def test_a_skipped_collective_stops_every_rank_with_the_table(tmp_path):
    result = _torchrun(tmp_path, SKIPPED)
    assert result.returncode != 0, _shown(result)
    assert result.stderr.count("CollectiveMismatchError") >= 2, _shown(result)
    assert re.search(r"0\s+gather\s+\S*train.py:7", result.stderr), _shown(result)
    assert re.search(r"1\s+wait_for_everyone\s+\S*train.py:8", result.stderr), _shown(result)
