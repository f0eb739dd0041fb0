"""The big-model benchmark runs end to end in --quick mode: every variant generates the plain model's tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_big_model_benchmark_reports_every_variant(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "big_model.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_big_model.py"), "--quick", "--no-accelerate"]
    proc = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"plain", "distrib", "distrib offload", "distrib disk"}
    assert all(row["same tokens"] == "yes" for row in rows.values())
    assert (
        rows["distrib"]["blocks on disk"] == "0 of 4" and rows["distrib disk"]["blocks on disk"] == "4 of 4"
    )
    assert len(result["rounds"]) == result["config"]["rounds"]
