"""The benchmark harness works end to end: a --quick run of the cheapest benchmark writes JSON and a report.

Timing values are not checked (they mean nothing in a smoke run), only the shape of the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_of_the_cheapest_benchmark_writes_json_and_a_report(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only", "dataloader",
        "--no-accelerate", "--out-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"

    result = json.loads((tmp_path / "dataloader.json").read_text())
    assert result["benchmark"] == "dataloader" and result["quick"] is True
    assert {"cpu_count", "torch"} <= set(result["machine"])
    assert result["goal"] == {"variant": "distrib", "max_ratio": 1.05}
    assert [case["case"] for case in result["cases"]] == ["tensor", "tokenised"]
    for case in result["cases"]:
        for kind in ("variants", "cpu"):
            assert set(case[kind]) == {"raw", "distrib"}
            for entry in case[kind].values():
                assert {
                    "median",
                    "p25",
                    "p75",
                    "samples",
                    "ratio",
                    "ratio_p25",
                    "ratio_p75",
                    "launch_ratios",
                } <= set(entry)
                assert entry["samples"] >= 1 and len(entry["launch_ratios"]) == 1
            assert case[kind]["raw"]["ratio"] == 1.0

    collected = json.loads((tmp_path / "all.json").read_text())
    assert [r["benchmark"] for r in collected] == ["dataloader"]
    report = (tmp_path / "benchmarks.md").read_text()
    assert "--quick" in report and "## Machine" in report and "| dataloader | tensor |" in report


def test_missing_benchmarks_are_reported_as_skipped(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    skipped = {"benchmark": "memory", "skipped": "benchmarks/bench_memory.py does not exist yet"}
    text = run_all.render([skipped], quick=True)
    assert "Not measured: benchmarks/bench_memory.py does not exist yet." in text
