"""Tracking, logging, progress bar and profiler on two real processes (gloo), in one launch to save time.

Each check that matters is that rank 1 stays silent (or takes its turn) while rank 0 does the work.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distrib
from distrib.testing import run_ranks

pytestmark = pytest.mark.slow


class CountingTracker:
    name = "counter"

    def __init__(self) -> None:
        self.calls = 0

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        self.calls += 1

    def log(self, values: dict[str, Any], step: int | None) -> None:
        self.calls += 1

    def finish(self) -> None:
        self.calls += 1


def _track(rank: int, out: Path) -> dict[str, Any]:
    counter = CountingTracker()
    distrib.init_trackers(
        "proj", config={"lr": 0.1}, trackers=["jsonl", counter], logging_dir=out / f"runs{rank}"
    )
    for step in range(3):
        distrib.log({"loss": torch.tensor(float(step))}, step=step)
    distrib.get_tracker("jsonl", unwrap=True).flush()  # a no-op on rank 1
    distrib.end_training()
    return {"tracker_calls": counter.calls}


def _log(rank: int, out: Path) -> None:
    handler = logging.FileHandler(out / "log.txt")  # both ranks append to the same file
    handler.setFormatter(logging.Formatter("%(message)s"))
    base = logging.getLogger("distrib.tests.multiprocess")
    base.addHandler(handler)
    base.propagate = False
    logger = distrib.get_logger(base.name, log_level="INFO", rank_prefix=True)
    logger.info("main only")
    logger.info("everyone", main_process_only=False)
    distrib.wait_for_everyone()
    if rank == 0:
        time.sleep(0.5)  # without a barrier between turns, rank 1 would log first
    logger.info("in order", in_order=True)
    handler.close()


def _progress() -> dict[str, Any]:
    buffer = io.StringIO()
    bar = distrib.progress_bar(range(3), desc="steps", file=buffer)
    disabled = bar.disable
    return {"bar_disabled": disabled, "items": list(bar), "bar_output": buffer.getvalue()}


def _rank_checks(out_dir: str) -> dict[str, Any]:
    out = Path(out_dir)
    with distrib.distributed() as ctx:
        result = _track(ctx.rank, out)
        _log(ctx.rank, out)
        result |= _progress()
        with distrib.profile(out / "traces") as prof:
            torch.randn(8, 8) @ torch.randn(8, 8)
            prof.step()
    return result


def test_only_rank_0_tracks_logs_and_shows_progress_and_every_rank_profiles(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks(_rank_checks, 2, str(tmp_path), timeout=90)

    records = [
        json.loads(line) for line in (tmp_path / "runs0" / "proj" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["step"], r["loss"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert json.loads((tmp_path / "runs0" / "proj" / "config.json").read_text()) == {"lr": 0.1}
    assert not (tmp_path / "runs1").exists()
    assert (rank0["tracker_calls"], rank1["tracker_calls"]) == (5, 0)

    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [line for line in lines if "main only" in line] == ["[rank 0/2] main only"]
    assert sorted(line for line in lines if "everyone" in line) == [
        "[rank 0/2] everyone",
        "[rank 1/2] everyone",
    ]
    assert [line for line in lines if "in order" in line] == ["[rank 0/2] in order", "[rank 1/2] in order"]

    assert (rank0["bar_disabled"], rank1["bar_disabled"]) == (False, True)
    assert rank0["items"] == rank1["items"] == [0, 1, 2]
    assert "steps" in rank0["bar_output"] and rank1["bar_output"] == ""

    for rank in (0, 1):
        trace = json.loads((tmp_path / "traces" / f"trace_rank{rank}.json").read_text())
        assert trace["traceEvents"]
