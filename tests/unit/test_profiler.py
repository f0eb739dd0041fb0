"""`profile()` in one process; tests/test_tracking_multiprocess.py checks one trace per real rank."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch._dynamo

import distrib

# The profiler imports torch._dynamo on first use, which sets TORCHINDUCTOR_CACHE_DIR once per process;
# importing it here keeps the conftest's leaked-environment check from blaming the first profiling test.


def work() -> None:
    torch.randn(32, 32) @ torch.randn(32, 32)


def test_profile_writes_a_chrome_trace_named_by_rank(tmp_path: Path) -> None:
    with distrib.distributed(), distrib.profile(tmp_path / "traces", record_shapes=True) as prof:
        for _ in range(2):
            work()
            prof.step()
    trace = json.loads((tmp_path / "traces" / "trace_rank0.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    assert prof.key_averages().table(row_limit=3)


def test_profile_with_a_schedule_writes_one_trace_per_cycle(tmp_path: Path) -> None:
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=1, repeat=2)
    with distrib.profile(tmp_path, schedule=schedule, acc_events=True) as prof:  # outside a scope: rank 0
        for _ in range(7):
            work()
            prof.step()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace_rank0_step3.json", "trace_rank0_step6.json"]
