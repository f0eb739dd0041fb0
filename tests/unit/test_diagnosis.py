"""Stall dumps, the merged diagnosis (`merged_report`, called by `distrib launch`), and the watchdog's
stall path in one process (a one-rank group on an in-memory store)."""

from __future__ import annotations

import json
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distrib import _diagnosis
from distrib._diagnosis import STALL_EXIT_CODE, format_dump, merge, merged_report, write_dump

RUNPY = str(Path(sysconfig.get_paths()["stdlib"]) / "runpy.py")  # a library frame above the user's code


def _dump(rank, *, collective=None, stuck="/w/train.py:40", function="train_step", last=None, world=2):
    return {
        "version": 1,
        "rank": rank,
        "world_size": world,
        "stall_timeout": 300.0,
        "idle_seconds": 301.0,
        "in_collective": collective,
        "last_collectives": last or [],
        "stuck_at": stuck,
        "stuck_function": function,
        "stack": [
            {"file": RUNPY, "line": 1, "function": "_run", "code": ""},
            {"file": "/w/train.py", "line": 40, "function": function, "code": "time.sleep(600)"},
        ],
        "threads": {},
    }


GATHER = {
    "seq": 12,
    "op": "gather",
    "site": "/w/train.py:55",
    "tensors": ["float32[2]"],
    "waiting_seconds": 301.0,
}
REDUCE = {"seq": 11, "op": "reduce", "site": "/w/train.py:30", "tensors": [], "seconds": 0.1, "outcome": "ok"}


def test_the_rank_not_in_the_collective_is_named_with_where_it_is_stuck(tmp_path):
    write_dump(tmp_path, _dump(0, collective=GATHER))
    write_dump(tmp_path, _dump(1, last=[REDUCE]))
    write_dump(tmp_path, _dump(2, collective=GATHER, world=4))
    write_dump(tmp_path, _dump(3, collective=GATHER, world=4))
    report = merged_report(tmp_path)
    assert report is not None
    lines = report.splitlines()
    assert "no rank made progress for 300 s (stall_timeout)" in lines[0]
    assert "ranks 0, 2, 3 wait in collective #12: gather() at /w/train.py:55" in report
    assert "rank 1 is NOT in that collective: stuck at /w/train.py:40 in train_step" in report
    assert "(its last collective: #11 reduce() at /w/train.py:30)" in report
    assert "time.sleep(600)" in report and "runpy" not in report, "the stack starts at the user's code"
    assert str(tmp_path) in report


def test_a_rank_in_another_collective_and_a_rank_without_a_dump(tmp_path):
    other = {**GATHER, "seq": 12, "op": "reduce", "site": "/w/train.py:30"}
    dumps = {0: _dump(0, collective=GATHER, world=3), 1: _dump(1, collective=other, world=3)}
    report = merge(dumps)
    assert "rank 1 is in a different collective: #12 reduce() at /w/train.py:30" in report
    assert "rank 2 sent no dump" in report


def test_a_rank_that_left_the_run_is_named_with_its_reason():
    left = {"rank": 1, "world_size": 3, "left": "it raised ValueError: bad batch at /w/train.py:40"}
    report = merge(
        {0: _dump(0, collective=GATHER, world=3), 1: left, 2: _dump(2, collective=GATHER, world=3)}
    )
    assert "rank 1 left the run before: it raised ValueError: bad batch at /w/train.py:40" in report
    assert "ranks 0, 2 wait in collective #12" in report and "sent no dump" not in report


def test_without_any_rank_in_a_collective_each_rank_says_where_it_is():
    report = merge(
        {0: _dump(0, stuck="/w/a.py:1", function="f"), 1: _dump(1, stuck="/w/b.py:2", function="g")}
    )
    assert "no rank is inside a distrib collective" in report
    assert "rank 0 is at /w/a.py:1 in f" in report and "rank 1 is at /w/b.py:2 in g" in report


def test_rank_zeros_collection_fills_in_ranks_whose_files_are_elsewhere(tmp_path):
    write_dump(tmp_path, _dump(0, collective=GATHER))
    write_dump(
        tmp_path, {"rank": "collected", "dumps": [_dump(0, collective=GATHER), _dump(1)]}, "collected.json"
    )
    report = merged_report(tmp_path)
    assert "rank 1 is NOT in that collective" in report and "sent no dump" not in report


def test_no_dumps_no_report(tmp_path):
    assert merged_report(tmp_path) is None
    assert merged_report(tmp_path / "missing") is None
    (tmp_path / "rank_0.json").write_text("{not json")
    assert merged_report(tmp_path) is None, "a torn or foreign file is skipped"


def test_dumps_are_written_whole(tmp_path):
    path = write_dump(tmp_path, _dump(3))
    assert path.name == "rank_3.json" and json.loads(path.read_text())["rank"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["rank_3.json"], "no temporary file left behind"


def test_a_dump_of_a_thread_stuck_in_user_code():
    release = threading.Event()

    def stuck_here():
        release.wait(30)

    thread = threading.Thread(target=stuck_here)
    thread.start()
    try:
        time.sleep(0.05)
        dump = _diagnosis.make_dump(
            rank=1,
            world_size=2,
            stall_timeout=5,
            idle_seconds=6,
            thread_id=thread.ident,
            in_collective=None,
            last_collectives=[REDUCE],
            optimizer_steps=3,
        )
    finally:
        release.set()
        thread.join()
    assert dump["stuck_function"] == "stuck_here"
    assert dump["stuck_at"] == f"{__file__}:{stuck_here.__code__.co_firstlineno + 1}"
    text = format_dump(dump)
    assert "rank 1 made no progress for 6 s" in text and "not in a collective; stuck at" in text
    assert "#11 reduce() at /w/train.py:30" in text


# -- the watchdog in one process ---------------------------------------------------------------------------


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _runtime():
    from tests._support.runtime import fake_runtime

    return fake_runtime()


@pytest.mark.parametrize("to_directory", [True, False])
def test_the_watchdog_dumps_and_ends_a_stalled_process(one_rank_group, tmp_path, capsys, to_directory):
    from distrib._ledger import Ledger
    from distrib._watchdog import Watchdog

    runtime = _runtime()
    release, exited = threading.Event(), threading.Event()
    codes = []

    def idle_scope_thread():
        release.wait(60)

    thread = threading.Thread(target=idle_scope_thread)
    thread.start()
    watchdog = Watchdog(
        runtime, Ledger(0, 1), stall_timeout=0.5, directory=tmp_path if to_directory else None
    )
    watchdog.scope_thread = thread.ident
    watchdog._exit = lambda code: (codes.append(code), exited.set())
    try:
        watchdog.start()
        assert exited.wait(60), "the watchdog ended the stalled run"
    finally:
        release.set()
        thread.join()
        watchdog.stop()
    assert codes == [STALL_EXIT_CODE]
    err = capsys.readouterr().err
    if to_directory:
        dump = json.loads((tmp_path / "rank_0.json").read_text())
        assert dump["stuck_function"] == "idle_scope_thread"
        assert (tmp_path / "collected.json").is_file()
        assert "its state is in" in err
    else:
        assert "rank 0 made no progress" in err and "no rank made progress" in err


def test_progress_is_what_the_scope_thread_does(one_rank_group):
    from distrib._ledger import Ledger
    from distrib._watchdog import Watchdog

    runtime = _runtime()
    ledger = Ledger(0, 1)
    watchdog = Watchdog(runtime, ledger, stall_timeout=100, directory=Path("/nonexistent"))
    first = watchdog._sample()
    assert watchdog._sample()[:3] == first[:3]
    ledger.completed += 1
    assert watchdog._sample()[0] != first[0], "a finished collective is progress"
    runtime.state.optimizer_steps += 1
    assert watchdog._sample()[1] != first[1], "an optimizer step is progress"


def _runtime_on(device):
    import dataclasses

    return dataclasses.replace(_runtime(), device=device)


def test_a_thread_busy_on_the_cpu_is_progress_even_where_its_frame_stands_still(one_rank_group):
    from distrib._ledger import Ledger
    from distrib._watchdog import Watchdog

    ledger = Ledger(0, 1)
    watchdog = Watchdog(_runtime(), ledger, stall_timeout=100, directory=Path("/nonexistent"))
    stop, started = threading.Event(), threading.Event()

    def spin():  # one frame, at the same few instructions at every sample
        started.set()
        while not stop.is_set():
            pass

    def sleep():
        started.set()
        stop.wait(60)

    for target, busy in ((spin, True), (sleep, False)):
        stop.clear()
        started.clear()
        thread = threading.Thread(target=target)
        thread.start()
        started.wait(10)
        watchdog.scope_thread = thread.ident
        try:
            watchdog._busy()
            time.sleep(0.3)
            assert watchdog._busy() is busy, target.__name__
            if busy:  # CPU spent inside a collective is waiting, not progress
                ledger.current = (1, None, time.monotonic())  # type: ignore[assignment]
                watchdog._busy()
                time.sleep(0.3)
                assert watchdog._busy() is False
                ledger.current = None
                # on a GPU, a CPU spinning at a synchronisation behind a hung NCCL kernel is no progress
                gpu = Watchdog(
                    _runtime_on(torch.device("cuda", 0)), ledger, stall_timeout=100, directory=Path("/x")
                )
                gpu.scope_thread = thread.ident
                gpu._busy()
                time.sleep(0.3)
                assert gpu._busy() is False
        finally:
            stop.set()
            thread.join()
