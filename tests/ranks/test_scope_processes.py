"""Several scopes one after another in one process, on two real processes (run_ranks and torchrun)."""

from __future__ import annotations

import pytest
import torch

from distrib import distributed

REPEATED_SCOPES = """
import torch
import distrib

for i in range(3):
    with distrib.distributed(cpu=True) as ctx:
        total = distrib.reduce(torch.tensor([float(i + ctx.rank)]))
        print(f"SCOPE {i} rank {ctx.rank} sum {total.item():g}", flush=True)
"""


@pytest.mark.parametrize("launcher", ["torchrun", "run_ranks"])
def test_repeated_scopes_on_two_processes(tmp_path, launcher):
    import subprocess
    import sys

    from distrib.testing import free_port, run_ranks

    if launcher == "run_ranks":
        assert run_ranks(_three_scopes, 2, timeout=120) == [[1.0, 3.0, 5.0]] * 2
        return
    script = tmp_path / "repeat.py"
    script.write_text(REPEATED_SCOPES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(script)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    for i in range(3):
        assert f"SCOPE {i} rank 0 sum {2 * i + 1}" in result.stdout


def _three_scopes() -> list[float]:
    from distrib import reduce

    sums = []
    for i in range(3):
        with distributed(cpu=True) as ctx:
            sums.append(reduce(torch.tensor([float(i + ctx.rank)])).item())
    return sums
