"""Faults during a real `distrib launch`: the report blames the right rank, workers never outlive their
launcher, signals reach the workers, preemption exits 75 without a restart, crash loops stop early.

Each test starts real worker processes over gloo (about 2 s per rank here); timeouts are generous and
every assertion shows the launch's whole output.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests._support.launching import finish, pid_alive, run, script, shown, start, wait_for

pytestmark = pytest.mark.slow

# rank 1 leaves or stalls while rank 0 goes on to a collective (gloo, a short process-group timeout)
BEHAVIOUR = """
    import os, signal, sys, time
    import torch
    import distrib

    with distrib.distributed(timeout=8) as ctx:
        distrib.wait_for_everyone()
        if ctx.rank == 1:
            how = os.environ["HOW"]
            if how == "oom":
                os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
            if how == "exit":
                sys.exit(0)
            if how == "stuck":
                time.sleep(120)  # STUCK HERE
        time.sleep(1)
        distrib.reduce(torch.ones(1), "sum")
        time.sleep(120)
"""


def test_a_rank_killed_by_a_sigkill_the_launcher_did_not_send_is_blamed_with_137(tmp_path: Path):
    name = script(tmp_path, "behaviour.py", BEHAVIOUR)
    result = run(tmp_path, "launch", "--num-processes", "2", name, HOW="oom")
    assert result.returncode == 137, shown(result)
    assert "distrib: rank 1 (local rank 1) on machine 0" in result.stderr, shown(result)
    assert "failed first: killed by SIGKILL" in result.stderr and "the launcher did not send" in result.stderr
    assert "rank 0 (local rank 0): stopped by the launcher" in result.stderr, shown(result)


def test_a_rank_that_exits_early_is_blamed_not_the_rank_waiting_for_it(tmp_path: Path):
    name = script(tmp_path, "behaviour.py", BEHAVIOUR)
    result = run(tmp_path, "launch", "--num-processes", "2", name, HOW="exit")
    assert result.returncode == 1, shown(result)
    headline = next(line for line in result.stderr.splitlines() if line.startswith("distrib: rank"))
    assert headline.startswith("distrib: rank 1 on machine 0"), shown(result)
    assert "exited early (exit code 0" in headline and "rank 0 then failed waiting for it" in headline


def test_a_stuck_rank_is_named_with_the_line_it_is_stuck_at(tmp_path: Path):
    name = script(tmp_path, "behaviour.py", BEHAVIOUR)
    line = next(
        i for i, text in enumerate((tmp_path / name).read_text().splitlines(), 1) if "STUCK HERE" in text
    )
    result = run(tmp_path, "launch", "--num-processes", "2", name, HOW="stuck")
    assert result.returncode == 1, shown(result)
    headline = next(text for text in result.stderr.splitlines() if text.startswith("distrib: rank"))
    assert headline.startswith("distrib: rank 1 (local rank 1) on machine 0"), shown(result)
    assert f"stuck at {tmp_path / name}:{line} (in <module>)" in headline, shown(result)
    assert "rank 0 failed waiting for it" in result.stderr
    assert "Diagnostics of this run are kept in" in result.stderr


SLEEPER = """
    import os, signal, sys, time
    print(f"WORKER rank={os.environ['RANK']} pid={os.getpid()}", flush=True)
    if os.environ.get("SAVE_ON_SIGNAL"):
        def save_and_leave(signum, frame):
            print(f"SIGNAL rank={os.environ['RANK']} {signal.Signals(signum).name}", flush=True)
            time.sleep(0.5)  # "saving"
            sys.exit(75)
        signal.signal(signal.SIGTERM, save_and_leave)
        signal.signal(signal.SIGUSR1, save_and_leave)
    time.sleep(600)
"""


def _worker_pids(path: Path, count: int) -> dict[int, int]:
    wait_for(lambda: len(re.findall(r"WORKER rank=", path.read_text())) >= count, what=f"{count} workers")
    return {int(r): int(p) for r, p in re.findall(r"WORKER rank=(\d+) pid=(\d+)", path.read_text())}


def test_workers_die_with_a_launcher_killed_by_sigkill(tmp_path: Path):
    name = script(tmp_path, "sleeper.py", SLEEPER)
    launcher = start(tmp_path, "launch", "--num-processes", "2", "--grace-period", "3", name)
    pids = _worker_pids(tmp_path / "out.txt", 2)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    try:
        wait_for(
            lambda: not any(pid_alive(p) for p in pids.values()),
            timeout=30,
            what="the orphaned workers to die",
        )
    finally:
        for pid in pids.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_the_launcher_reaches_the_workers_and_preemption_exits_75(tmp_path: Path, signum: int):
    name = script(tmp_path, "sleeper.py", SLEEPER)
    launcher = start(tmp_path, "launch", "--num-processes", "2", name, SAVE_ON_SIGNAL="1")
    _worker_pids(tmp_path / "out.txt", 2)
    launcher.send_signal(signum)
    code = finish(launcher)
    out = (tmp_path / "out.txt").read_text()
    assert code == 75, out
    name_ = signal.Signals(signum).name
    assert f"SIGNAL rank=0 {name_}" in out and f"SIGNAL rank=1 {name_}" in out, out
    assert f"received {name_} and forwarded it to the workers, which saved and exited with code 75" in out


def test_workers_that_ignore_the_grace_period_are_killed_and_the_signal_is_the_exit_code(tmp_path: Path):
    name = script(
        tmp_path,
        "stubborn.py",
        SLEEPER.replace('if os.environ.get("SAVE_ON_SIGNAL"):', "if True:").replace(
            "sys.exit(75)", "time.sleep(600)"
        ),
    )
    launcher = start(tmp_path, "launch", "--num-processes", "2", "--grace-period", "2", name)
    pids = _worker_pids(tmp_path / "out.txt", 2)
    launcher.send_signal(signal.SIGTERM)
    code = finish(launcher)
    out = (tmp_path / "out.txt").read_text()
    assert code == 128 + signal.SIGTERM, out
    assert "received SIGTERM; forwarded it to the workers and stopped them (grace period 2 s" in out, out
    assert "killed after the grace period" in out
    assert not any(pid_alive(p) for p in pids.values())


def test_a_preempted_worker_is_not_restarted_and_the_launcher_exits_75(tmp_path: Path):
    name = script(tmp_path, "sleeper.py", SLEEPER)
    launcher = start(
        tmp_path,
        "launch",
        "--num-processes",
        "2",
        "--max-restarts",
        "2",
        "--grace-period",
        "4",
        name,
        SAVE_ON_SIGNAL="1",
    )
    pids = _worker_pids(tmp_path / "out.txt", 2)
    os.kill(pids[1], signal.SIGTERM)  # SLURM or a spot reclaim signals one worker; it saves and leaves
    code = finish(launcher)
    out = (tmp_path / "out.txt").read_text()
    assert code == 75, out
    assert "distrib: preempted: the workers saved and exited with code 75" in out, out
    assert "restarting" not in out and out.count("WORKER rank=1") == 1, out


CRASH_LOOP = """
    import os, torch, distrib
    print(f"ATTEMPT {os.environ['TORCHELASTIC_RESTART_COUNT']} rank={os.environ['RANK']}", flush=True)
    with distrib.distributed() as ctx:
        model = torch.nn.Linear(2, 1)
        model, optimizer = distrib.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        for _ in range(10):
            if ctx.state.optimizer_steps == 3 and ctx.rank == 1:
                raise RuntimeError(f"bad batch at step {ctx.state.optimizer_steps}")
            distrib.backward(model(torch.ones(4, 2)).sum())
            optimizer.step()
            optimizer.zero_grad()
"""


def test_the_same_step_failing_after_a_restart_stops_as_a_crash_loop(tmp_path: Path):
    name = script(tmp_path, "loop.py", CRASH_LOOP)
    result = run(tmp_path, "launch", "--num-processes", "2", "--max-restarts", "5", name)
    assert result.returncode == 1, shown(result)
    assert (
        "distrib: crash loop at step 3: attempt 1 failed at optimizer step 3 again, as attempt 0 did"
        in result.stderr
    )
    assert "4 remaining restart(s) of --max-restarts 5" in result.stderr, shown(result)
    assert (
        'raise RuntimeError(f"bad batch at step' in result.stderr
        and "RuntimeError: bad batch at step 3" in result.stderr
    )
    assert "ATTEMPT 2" not in result.stdout, shown(result)


def test_a_group_that_makes_progress_between_failures_keeps_its_restarts(tmp_path: Path):
    name = script(
        tmp_path,
        "progress.py",
        """
        import os, torch, distrib
        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        with distrib.distributed() as ctx:
            model = torch.nn.Linear(2, 1)
            model, optimizer = distrib.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
            for _ in range(4):
                if ctx.rank == 1 and attempt < 2 and ctx.state.optimizer_steps == attempt + 1:
                    raise RuntimeError(f"flaky at step {ctx.state.optimizer_steps}")
                distrib.backward(model(torch.ones(4, 2)).sum())
                optimizer.step()
                optimizer.zero_grad()
        print(f"FINISHED attempt={attempt}", flush=True)
        """,
    )
    started = time.monotonic()
    result = run(tmp_path, "launch", "--num-processes", "2", "--max-restarts", "3", name)
    assert result.returncode == 0, shown(result) + f"\n({time.monotonic() - started:.0f} s)"
    assert "FINISHED attempt=2" in result.stdout and "crash loop" not in result.stderr, shown(result)
