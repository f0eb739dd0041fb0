"""`distrib launch` on a CUDA machine: one process per GPU by default, --gpu-ids, fp16 accepted on CUDA, and
the failure report of a worker that dies on the GPU. Skipped (with the reason) without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._support.launching import run, script, shown

pytestmark = pytest.mark.gpu

REPORT = """
    import json, os
    import torch
    import distrib

    with distrib.distributed() as ctx:
        total = distrib.reduce(torch.ones(1, device=ctx.device), "sum").item()
        print("REPORT " + json.dumps({
            "rank": ctx.rank, "world": ctx.world_size, "device": str(ctx.device), "mp": ctx.mixed_precision,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "sum": total,
        }), flush=True)
"""


def _reports(stdout: str) -> list[dict]:
    return sorted(
        (json.loads(line.split("REPORT ", 1)[1]) for line in stdout.splitlines() if "REPORT " in line),
        key=lambda r: r["rank"],
    )


def test_default_launch_uses_every_gpu_with_fp16(tmp_path: Path):
    name = script(tmp_path, "report.py", REPORT)
    result = run(tmp_path, "launch", "--mixed-precision", "fp16", name)
    assert result.returncode == 0, shown(result)
    found = _reports(result.stdout)
    count = torch.cuda.device_count()
    assert [r["rank"] for r in found] == list(range(count)), shown(result)
    assert all(r["device"].startswith("cuda") and r["mp"] == "fp16" and r["sum"] == count for r in found)


def test_gpu_ids_choose_the_gpus(tmp_path: Path):
    name = script(tmp_path, "report.py", REPORT)
    result = run(tmp_path, "launch", "--gpu_ids", "0", name)  # Accelerate's spelling
    assert result.returncode == 0, shown(result)
    (only,) = _reports(result.stdout)
    assert (only["world"], only["visible"], only["device"]) == (1, "0", "cuda:0")


def test_a_worker_that_fails_on_the_gpu_is_reported_with_its_traceback(tmp_path: Path):
    name = script(
        tmp_path,
        "fail.py",
        """
        import torch
        import distrib

        with distrib.distributed() as ctx:
            x = torch.ones(2, device=ctx.device)
            raise RuntimeError(f"failed on {x.device}")
        """,
    )
    result = run(tmp_path, "launch", "--num-processes", "1", name)
    assert result.returncode == 1, shown(result)
    assert "failed first: exit code 1" in result.stderr and "RuntimeError: failed on cuda:0" in result.stderr
