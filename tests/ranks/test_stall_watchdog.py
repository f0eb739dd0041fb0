"""The stall watchdog on real processes: a rank stuck outside any collective is named by the merged
diagnosis; a rank that is busy (not stuck) while the others wait is not a stall."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from distrib._diagnosis import STALL_EXIT_CODE, merged_report
from distrib.testing import RanksFailed, run_ranks


def stuck_outside_any_collective() -> None:
    time.sleep(600)  # the line the diagnosis must name


def _stuck_worker() -> None:
    from distrib import distributed, gather, reduce

    with distributed(stall_timeout=3) as ctx:
        gather(torch.ones(2))
        reduce(torch.ones(1))
        if ctx.rank == 1:
            stuck_outside_any_collective()
        gather(torch.ones(2))  # rank 0 waits here for rank 1, which never comes


STUCK_LINE = stuck_outside_any_collective.__code__.co_firstlineno + 1


def test_the_merged_diagnosis_names_the_rank_that_is_not_in_the_collective(tmp_path):
    with pytest.raises(RanksFailed, match=rf"exit code {STALL_EXIT_CODE}"):
        run_ranks(_stuck_worker, 2, timeout=240, env={"DISTRIB_DIAGNOSTICS_DIR": str(tmp_path)})
    report = merged_report(tmp_path)
    assert report is not None
    assert re.search(
        rf"rank 1 is NOT in that collective: stuck at \S+test_stall_watchdog.py:{STUCK_LINE} ", report
    ), report
    assert re.search(r"rank 0 waits in collective #3: gather\(\) at \S+test_stall_watchdog.py:\d+", report), (
        report
    )
    assert "its last collective: #2 reduce()" in report
    dumps = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank_*.json")}
    assert set(dumps) == {"rank_0.json", "rank_1.json"}
    assert dumps["rank_0.json"]["in_collective"]["op"] == "gather"
    assert dumps["rank_1.json"]["in_collective"] is None
    assert [e["op"] for e in dumps["rank_1.json"]["last_collectives"]] == ["gather", "reduce"]


def test_outside_distrib_launch_the_dumps_and_the_diagnosis_go_to_stderr(capfd):
    with pytest.raises(RanksFailed):
        run_ranks(_stuck_worker, 2, timeout=240)
    err = capfd.readouterr().err
    assert "distrib: rank 1 made no progress" in err and "distrib: rank 0 made no progress" in err
    assert "stuck_outside_any_collective" in err, "each rank prints its stack"
    assert re.search(
        rf"rank 1 is NOT in that collective: stuck at \S+test_stall_watchdog.py:{STUCK_LINE} ", err
    ), err


def _busy_worker() -> int:
    from distrib import distributed, gather

    with distributed(stall_timeout=1.5) as ctx:
        for _ in range(2):
            if ctx.rank == 0:  # busy for twice the stall timeout while rank 1 waits in the gather
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline:
                    torch.ones(8).sum()
            gather(torch.ones(1))
        return ctx.rank


def test_a_busy_rank_is_not_a_stall():
    assert run_ranks(_busy_worker, 2, timeout=240) == [0, 1]
