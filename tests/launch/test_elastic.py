"""Elastic membership: `distrib launch --num-machines 1:2` on two "machines" (two launchers on loopback).

A machine that joins a running group, leaves it (its launcher killed) and joins again makes the agents
restart the group at the new size, and the script resumes from its last checkpoint each time.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from distrib.testing import free_port
from tests._support.launching import finish, script, start, wait_for

pytestmark = pytest.mark.slow

TRAIN = """
    import os, time
    import torch
    import distrib

    with distrib.distributed(project_dir="run", total_limit=2) as ctx:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        model, optimizer = distrib.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
        resumed = distrib.load_state("latest") is not None
        print(f"START world={ctx.world_size} rank={ctx.rank} step={ctx.state.optimizer_steps} "
              f"resumed={resumed}", flush=True)
        while not os.path.exists("finish") or ctx.state.optimizer_steps < 5:
            distrib.backward(model(torch.ones(2, 4)).sum())
            optimizer.step()
            optimizer.zero_grad()
            distrib.save_state()
            print(f"STEP {ctx.state.optimizer_steps} world={ctx.world_size} rank={ctx.rank}", flush=True)
            time.sleep(0.3)
    print(f"DONE rank={os.environ['RANK']}", flush=True)
"""


def _starts(path: Path) -> list[tuple[int, int, bool]]:
    found = re.findall(r"START world=(\d+) rank=\d+ step=(\d+) resumed=(\w+)", path.read_text())
    return [(int(w), int(s), r == "True") for w, s, r in found]


def _shown(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text()}" for p in sorted(tmp_path.glob("out*.txt")))


def test_machines_leave_and_join_and_the_run_resumes_at_each_new_size(tmp_path: Path):
    name = script(tmp_path, "train.py", TRAIN)
    args = [
        "launch",
        "--num-machines", "1:2",
        "--rdzv-backend", "c10d",
        "--main-process-ip", "127.0.0.1",
        "--main-process-port", str(free_port()),
        "--num-processes-per-machine", "1",
        "--max-restarts", "3",
        "--rdzv-timeout", "120",
        "--rdzv-conf", "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3",
        "--cpu",
    ]  # fmt: skip
    a = start(tmp_path, *args, "--machine-rank", "0", name, output="out_a.txt")
    out_a = tmp_path / "out_a.txt"
    launched: list = [a]
    try:
        wait_for(lambda: "STEP 2 world=1" in out_a.read_text(), what="machine 0 to train alone")
        b = start(tmp_path, *args, "--machine-rank", "1", name, output="out_b.txt")
        launched.append(b)
        wait_for(lambda: re.search(r"STEP \d+ world=2", out_a.read_text()) is not None, what="the group of 2")
        b.send_signal(signal.SIGKILL)  # machine 1 goes away, its workers with it
        b.wait()
        wait_for(lambda: len(_starts(out_a)) >= 3, what="machine 0 to go on alone")
        wait_for(lambda: re.search(r"STEP \d+ world=1", out_a.read_text().split("START")[-1]) is not None)
        b2 = start(tmp_path, *args, "--machine-rank", "1", name, output="out_b2.txt")
        launched.append(b2)
        wait_for(lambda: len(_starts(out_a)) >= 4, what="machine 1 to join again")
        (tmp_path / "finish").touch()
        assert finish(a) == 0, _shown(tmp_path)
        assert finish(b2) == 0, _shown(tmp_path)
    finally:
        for proc in launched:
            if proc.poll() is None:
                proc.kill()
    starts = _starts(out_a)
    assert [world for world, _, _ in starts] == [1, 2, 1, 2], _shown(tmp_path)
    assert starts[0][1:] == (0, False)
    steps_before = [
        max(map(int, re.findall(r"STEP (\d+)", part)), default=0)
        for part in out_a.read_text().split("START")[1:]
    ]
    for (_, step, resumed), previous in zip(starts[1:], steps_before):
        # the last checkpoint, not step 0: the step last printed, or one more when the workers were stopped
        # between saving it and printing it, or one less when they were stopped in the middle of a save
        assert resumed and step > 0 and previous - 1 <= step <= previous + 1, _shown(tmp_path)
    assert "DONE rank=0" in out_a.read_text() and "DONE rank=1" in (tmp_path / "out_b2.txt").read_text()
    assert "a machine joined or left; restarting the worker group" in out_a.read_text()
