"""Preemption: SIGTERM (or SIGUSR1) to one rank makes every rank save the same step and exit with 75;
a relaunch resumes at the next step and ends where an uninterrupted run ends.

The ranks are plain processes with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...), so each
one's own exit code is visible (a launcher would fold them into one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distrib.testing import free_port

SCRIPT = r"""
import json, os, signal, sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from distrib import accumulate, backward, distributed, load_state, prepare

project, kill_at, signame, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with distributed(cpu=True, project_dir=project, gradient_accumulation_steps=2, seed=0) as ctx:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.97)
    model, optimizer, loader, scheduler = prepare(model, optimizer, DataLoader(data, batch_size=4, shuffle=True), scheduler)
    resumed = load_state("latest")
    start = ctx.optimizer_steps
    for epoch in range(loader.epoch, 3):
        for x, y in loader:
            with accumulate(model):
                backward(torch.nn.functional.mse_loss(model(x), y))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if ctx.optimizer_steps == kill_at and ctx.rank == 1 and ctx.state.sync_gradients:
                os.kill(os.getpid(), getattr(signal, signame))
    if ctx.rank == 0:
        weights = [float(v) for v in model.module.weight.detach().reshape(-1)]
        json.dump({"start": start, "steps": ctx.optimizer_steps, "weights": weights, "resumed": str(resumed)}, open(out, "w"))
"""


def _run_pair(
    tmp_path: Path, project: Path, kill_at: int, signame: str, out: Path
) -> list[subprocess.CompletedProcess[str]]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [sys.executable, str(script), str(project), str(kill_at), signame, str(out)]
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def _shown(results: list[subprocess.CompletedProcess[str]]) -> str:
    return "\n".join(
        f"--- rank {r}: exit {p.returncode}\n{p.stdout}{p.stderr}" for r, p in enumerate(results)
    )


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_signal_to_one_rank_saves_one_step_everywhere_and_a_relaunch_ends_like_an_uninterrupted_run(
    tmp_path: Path, signame: str
):
    reference = _run_pair(tmp_path, tmp_path / "plain", -1, signame, tmp_path / "plain.json")
    assert all(p.returncode == 0 for p in reference), _shown(reference)

    project = tmp_path / "preempted"
    first = _run_pair(tmp_path, project, 5, signame, tmp_path / "first.json")
    assert [p.returncode for p in first] == [75, 75], _shown(first)
    checkpoints = sorted(p.name for p in (project / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len(checkpoints) == 1, checkpoints  # one checkpoint, the same step on every rank
    saved_step = int(checkpoints[0].removeprefix("step_"))
    assert 5 <= saved_step <= 7, f"saved at step {saved_step}, soon after the signal at step 5"
    assert f"received {signame}" in first[1].stderr

    second = _run_pair(tmp_path, project, -1, signame, tmp_path / "second.json")
    assert all(p.returncode == 0 for p in second), _shown(second)
    resumed = json.loads((tmp_path / "second.json").read_text())
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert resumed["start"] == saved_step and resumed["steps"] == plain["steps"] == 12
    assert resumed["weights"] == pytest.approx(plain["weights"], rel=1e-6, abs=1e-7)
