"""Who the failure report blames, from the evidence a launch leaves (no processes): a kill the launcher did
not send, a rank that exited early, a rank stuck outside the collective; the workers' exit records and
stack dumps; the stall diagnosis; and how notebook_launcher chooses its start method."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest

from distrib import FSDPOptions, notebook_launcher
from distrib._launch import failures, notebook, records
from distrib._launch.agent import StopRecorder
from distrib._launch.executor import merged_diagnosis
from distrib.errors import LaunchError, SettingsError

PEER_LOST = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:4242"
TIMED_OUT = "RuntimeError: [unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation to complete"
STACK = """Thread 0x00007f0000000002 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/work/distrib/_launch/records.py", line 131 in _watch_launcher
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f0000000001 (most recent call first):
  File "/usr/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 4287 in all_gather
  File "/home/me/project/helpers.py", line 12 in wait_for_data
  File "/home/me/project/train.py", line 40 in <module>
  File "/x/distrib/_launch/worker.py", line 122 in _exec_as_main
  File "<frozen runpy>", line 88 in _run_code
"""


def failure(rank: int, exitcode: int, t: float, traceback: str = "", signalled: bool | None = False):
    return failures.WorkerFailure(
        rank=rank,
        local_rank=rank,
        exitcode=exitcode,
        pid=100 + rank,
        timestamp=t,
        traceback=traceback,
        signalled=signalled,
    )


def report(found, **evidence) -> str:
    return failures.format_report(found, failures.Evidence(hostname="node7", **evidence))


def test_a_sigkill_the_launcher_did_not_send_is_the_cause_with_exit_137():
    killed = failure(1, -9, 10.0, signalled=False)  # the OOM killer
    stopped = failure(0, -15, 10.0, signalled=True)  # the launcher, right after
    found = [stopped, killed]
    assert failures.first_failure(found) is killed
    text = report(found)
    assert text.startswith(
        "distrib: rank 1 (local rank 1) on machine 0 (node7) failed first: killed by SIGKILL"
    )
    assert "which the launcher did not send" in text and "out-of-memory killer" in text
    assert "rank 0 (local rank 0): stopped by the launcher (killed by SIGTERM)" in text
    assert failures.exit_code(failures.first_failure(found)) == 137


def test_when_the_launcher_did_signal_the_killed_rank_it_is_not_the_cause():
    own = failure(0, 1, 10.5, traceback="ValueError: boom", signalled=False)
    killed = failure(1, -9, 10.0, signalled=True)  # SIGKILL after the grace period: the launcher's
    assert failures.first_failure([killed, own]) is own


def test_a_rank_that_exited_early_is_blamed_not_the_rank_that_waited_for_it():
    waiting = failure(0, 1, 20.0, traceback=PEER_LOST)
    exits = {
        1: records.WorkerRecord(rank=1, exit_code=0, time=18.0),
        0: records.WorkerRecord(rank=0, exit_code=1, time=20.0),
    }
    text = report([waiting], exits=exits)
    first = text.splitlines()[0]
    assert first.startswith("distrib: rank 1 on machine 0 (node7) exited early (exit code 0, at ")
    assert "rank 0 then failed waiting for it (exit code 1)" in first
    assert PEER_LOST in text
    # a rank that finished after the failure is not blamed
    late = {1: records.WorkerRecord(rank=1, exit_code=0, time=25.0)}
    assert "exited early" not in report([waiting], exits=late)


def test_a_rank_stuck_outside_the_collective_is_named_with_its_file_and_line():
    waiting = failure(0, 1, 30.0, traceback=TIMED_OUT)
    stuck = failure(1, -15, 30.0, signalled=True)
    text = report([waiting, stuck], stacks={1: STACK})
    lines = text.splitlines()
    assert lines[0] == (
        "distrib: rank 1 (local rank 1) on machine 0 (node7) did not reach the collective the others waited in: "
        "it was still running, stuck at /home/me/project/helpers.py:12 (in wait_for_data) when the launcher stopped it."
    )
    assert '    File "/home/me/project/train.py", line 40 in <module>' in text
    assert "_watch_launcher" not in text and "worker.py" not in text
    assert "rank 0 failed waiting for it (exit code 1):" in text and TIMED_OUT in text
    assert "rank 0 (local rank 0)" not in text  # named once, as the one that waited


def test_a_wait_for_a_rank_on_another_machine_says_so():
    text = report([failure(2, 1, 5.0, traceback=PEER_LOST)], machine_rank=1)
    assert "rank 2 (local rank 2) on machine 1 (node7) failed waiting for another rank" in text
    assert "on another machine or left no trace here" in text


def test_the_stall_diagnosis_is_printed_after_the_headline():
    text = report([failure(0, 1, 1.0, traceback=TIMED_OUT)], diagnosis="rank 1 ... stuck at train.py:7\n")
    assert "Stall diagnosis (every rank's dump, merged):\nrank 1 ... stuck at train.py:7" in text


def test_merged_diagnosis_comes_from_the_hangs_module_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "distrib._diagnosis", None)  # not installed: skipped
    assert merged_diagnosis(tmp_path) is None
    seen: list[Path] = []
    fake = types.ModuleType("distrib._diagnosis")
    fake.merged_report = lambda directory: seen.append(directory) or f"merged from {directory.name}"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "distrib._diagnosis", fake)
    assert merged_diagnosis(tmp_path) == f"merged from {tmp_path.name}" and seen == [tmp_path]

    def broken(directory: Path) -> str:
        raise ValueError("bad dump")

    fake.merged_report = broken  # type: ignore[attr-defined]
    assert "could not be merged: ValueError: bad dump" in str(merged_diagnosis(tmp_path))


def test_preemption_and_the_failed_step():
    saved = [failure(0, 75, 1.0), failure(1, -15, 1.2, signalled=True)]
    assert failures.preempted(saved, 75)
    assert not failures.preempted([failure(0, 75, 1.0), failure(1, 1, 1.1)], 75)
    assert not failures.preempted([failure(0, 1, 1.0)], 75)
    assert not failures.preempted(saved, None), "preemption_exit_code=None: the workers catch no signal"
    exits = {0: records.WorkerRecord(0, 1, 1.0, step=7), 1: records.WorkerRecord(1, 1, 1.0, step=None)}
    assert failures.failed_step([failure(0, 1, 1.0, traceback="x")], exits) == 7
    assert failures.failed_step([failure(2, 1, 1.0, traceback="x")], exits) is None


# -- what workers leave -----------------------------------------------------------------------------------


def test_exit_records_round_trip_with_the_step_of_the_failing_scope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(records.DIAGNOSTICS_VARIABLE, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    inner = RuntimeError("inside the scope")
    inner.distrib_optimizer_step = 12  # type: ignore[attr-defined]
    try:
        try:
            raise inner
        except RuntimeError as exc:
            raise KeyError("outside") from exc
    except KeyError as outer:
        records.record_exit(1, outer, how="exception")
    found = records.read_records(tmp_path)
    assert list(found) == [3] and (found[3].exit_code, found[3].step, found[3].how) == (1, 12, "exception")
    (tmp_path / "launcher" / "rank-9.json").write_text("{not json")
    assert list(records.read_records(tmp_path)) == [3]
    assert records.read_records(None) == {}


def test_without_a_launcher_a_worker_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(records.DIAGNOSTICS_VARIABLE, raising=False)
    records.record_exit(0)
    assert not list(tmp_path.iterdir())


def test_the_stuck_frame_is_the_users_innermost_frame_of_the_main_thread():
    assert records.stuck_frame(STACK) == "/home/me/project/helpers.py:12 (in wait_for_data)"
    assert records.main_thread(STACK)[0].startswith("Current thread")
    only_library = (
        'Current thread 0x1 (most recent call first):\n  File "<frozen runpy>", line 88 in _run_code\n'
    )
    assert records.stuck_frame(only_library) is None and records.stuck_frame("") is None


def test_the_stop_recorder_collects_the_pids_the_launcher_signals():
    recorder = StopRecorder()
    logger = logging.getLogger("test.stop.recorder")
    logger.addFilter(recorder)
    logger.propagate = False
    logger.warning("Sending process %s closing signal %s", 4242, "SIGTERM")
    logger.warning("Closing process %s via signal %s", 4343, "SIGTERM")
    logger.warning("Unable to shutdown process %s via %s, forcefully exiting via %s", 4444, 15, 9)
    logger.warning("failed (exitcode: %s) local_rank: %s", 1, 0)
    assert recorder.pids == {4242, 4343, 4444}


# -- notebook_launcher before any process starts ------------------------------------------------------------


def _module_function():
    return 1


def test_start_method_follows_what_a_new_interpreter_could_import(monkeypatch: pytest.MonkeyPatch):
    assert notebook.default_start_method(_module_function) == "spawn"

    def nested():
        return 2

    assert notebook.default_start_method(nested) == "fork"
    stdin_main = types.ModuleType("__main__")
    stdin_main.__file__ = "<stdin>"  # python - < script.py
    monkeypatch.setitem(sys.modules, "__main__", stdin_main)
    assert notebook.default_start_method(_module_function) == "fork"
    with pytest.raises(
        LaunchError, match=r"re-runs the caller's main file, and '<stdin>' is not one.*start_method='fork'"
    ):
        notebook._check_start_method(_module_function, "spawn")
    repl_main = types.ModuleType("__main__")  # a REPL or notebook: no __file__
    monkeypatch.setitem(sys.modules, "__main__", repl_main)
    cell = types.FunctionType(_module_function.__code__, {}, "cell_fn")
    cell.__module__ = "__main__"
    assert notebook.default_start_method(cell) == "fork"


def test_spawn_refuses_a_function_it_cannot_pickle():
    with pytest.raises(LaunchError, match=r"cannot be pickled by name.*start_method='fork'"):
        notebook._check_start_method(lambda: 1, "spawn")


def test_a_function_setting_cannot_travel_to_the_launched_function():
    with pytest.raises(
        SettingsError, match=r"notebook_launcher\(\): fsdp.auto_wrap_policy takes a Python function"
    ):
        notebook_launcher(
            _module_function, num_processes=2, cpu=True, fsdp=FSDPOptions(auto_wrap_policy=callable)
        )


def test_after_a_stall_the_merged_diagnosis_is_the_headline_and_no_rank_failed_first():
    diagnosis = (
        "distrib: no rank made progress for 5 s (stall_timeout); every rank dumped its state.\n"
        "  rank 0 waits in collective #3: gather() at /w/train.py:20\n"
        "  rank 1 is NOT in that collective: stuck at /w/train.py:12 in load"
    )
    found = [failure(0, failures.STALL_EXIT_CODE, 9.0), failure(1, failures.STALL_EXIT_CODE, 9.1)]
    assert failures.stalled(found)
    text = report(found, diagnosis=diagnosis)
    assert text.startswith(diagnosis) and "failed first" not in text
    assert "ranks 0, 1 on machine 0 (node7) were ended by the stall watchdog (exit code 124)" in text
    assert failures.exit_code(failures.first_failure(found)) == 124
    without = report(found)
    assert without.startswith("distrib: the run stalled") and "no merged diagnosis was found" in without
    left = {1: records.WorkerRecord(rank=1, exit_code=0, time=3.0)}
    one = report([failure(0, failures.STALL_EXIT_CODE, 9.0)], diagnosis=diagnosis, exits=left)
    assert "rank 1 had exited early with code 0 at " in one and "it is the rank they waited for" in one
    assert (
        "  rank 0 on machine 0 (node7) was ended by the stall watchdog (exit code 124) after dumping its state."
        in one
    )
    crashed = [failure(0, failures.STALL_EXIT_CODE, 9.0), failure(1, 1, 9.5, traceback="ValueError: x")]
    assert not failures.stalled(crashed) and failures.first_failure(crashed).rank == 1  # a crash is the cause
