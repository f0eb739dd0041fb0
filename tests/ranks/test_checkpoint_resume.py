"""Exact resume: a run stopped at any micro-batch and resumed from its checkpoint ends with bit-identical
parameters, on one process and on two (gloo), mid-epoch and mid-accumulation, with shuffling, dropout
and python/numpy randomness in the loss; and resuming never loads the skipped samples.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distrib import accumulate, backward, distributed, prepare, unwrap_model
from distrib.checkpointing import load_state, register_for_checkpointing, save_state
from distrib.testing import run_ranks

NUM_SAMPLES, BATCH_SIZE, ACCUMULATION, EPOCHS = 44, 4, 4, 2


class CountingDataset(Dataset):  # type: ignore[type-arg]
    """A fixed regression set that counts how many samples were actually read."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(NUM_SAMPLES, 8, generator=g)
        self.y = torch.randn(NUM_SAMPLES, 1, generator=g)
        self.reads = 0

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.x[i], self.y[i]


class Tally:
    """A registered object: micro-batches done so far."""

    def __init__(self) -> None:
        self.micro_batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.micro_batches = state["micro_batches"]


def train(workdir: str, stop_after: int | None = None, resume: bool = False) -> dict[str, Any]:
    """Train for EPOCHS; with `stop_after`, save_state after that many micro-batches and return early.
    A resumed run starts from different seeds and weights, so only the checkpoint can make it match."""
    seed = 777 if resume else 0
    with distributed(project_dir=workdir, gradient_accumulation_steps=ACCUMULATION, seed=seed) as ctx:
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        dataset = CountingDataset()
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
        model, optimizer, loader, scheduler = prepare(model, optimizer, loader, scheduler)
        tally = Tally()
        register_for_checkpointing(tally)
        if resume:
            assert load_state("latest") is not None
        start = tally.micro_batches
        for _ in range(loader.epoch, EPOCHS):
            for x, y in loader:
                with accumulate(model):
                    noise = random.random() * 0.1 + float(np.random.rand()) * 0.1
                    loss = nn.functional.mse_loss(model(x) + noise, y)
                    backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                tally.micro_batches += 1
                if tally.micro_batches == stop_after:
                    save_state()
                    return {"reads": dataset.reads, "stopped": True}
        params = {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}
        return {
            "reads": dataset.reads,
            "params": params,
            "steps": ctx.state.optimizer_steps,
            "start": start,
            "lr": scheduler.get_last_lr(),
        }


def resume_equivalence(workdir: str, stop_points: list[int]) -> dict[str, Any]:
    """The uninterrupted run, then for each stop point a stopped run and its resumption."""
    reference = train(f"{workdir}/reference")
    results = {}
    for stop in stop_points:
        first = train(f"{workdir}/stop{stop}", stop_after=stop)
        resumed = train(f"{workdir}/stop{stop}", resume=True)
        results[stop] = {
            "identical": all(torch.equal(resumed["params"][k], v) for k, v in reference["params"].items()),
            "reads": first["reads"] + resumed["reads"],
            "start": resumed["start"],
            "steps": resumed["steps"],
            "lr": resumed["lr"],
        }
    return {"reference": {k: v for k, v in reference.items() if k != "params"}, "runs": results}


def _check(outcome: dict[str, Any], stop_points: list[int]) -> None:
    reference = outcome["reference"]
    for stop in stop_points:
        run = outcome["runs"][stop]
        assert run["start"] == stop, f"stop {stop}: the registered Tally was not restored"
        assert run["identical"], f"stop {stop}: resumed parameters differ from the uninterrupted run"
        assert run["steps"] == reference["steps"], f"stop {stop}: optimizer_steps {run['steps']}"
        assert run["lr"] == reference["lr"], f"stop {stop}: scheduler not restored"
        assert run["reads"] == reference["reads"], f"stop {stop}: skipped samples were read again"


# 1 process: 11 batches per epoch, windows [4, 4, 3]; stops mid-window, at a window's end, mid-window,
# at the epoch's end (after a short window) and mid-window in epoch 2
SINGLE_STOPS = [3, 4, 6, 11, 13]
# 2 processes: 6 batches per rank and epoch (the last one padded), windows [4, 2]; stops mid-window, at a
# window's end, at the epoch's end and mid-window in epoch 2
MULTI_STOPS = [3, 4, 6, 8]


def test_resume_is_exact_on_one_process(tmp_path: Path) -> None:
    outcome = resume_equivalence(str(tmp_path), SINGLE_STOPS)
    assert outcome["reference"]["steps"] == 2 * 3  # 11 batches per epoch -> windows 4, 4, 3
    _check(outcome, SINGLE_STOPS)


def _two_ranks(workdir: str) -> dict[str, Any]:
    with distributed():  # the outer scope owns the process group; each run opens its own inside
        return resume_equivalence(workdir, MULTI_STOPS)


@pytest.mark.slow
def test_resume_is_exact_on_two_processes(tmp_path: Path) -> None:
    outcomes = run_ranks(_two_ranks, 2, str(tmp_path), timeout=120)
    for outcome in outcomes:
        _check(outcome, MULTI_STOPS)
    assert outcomes[0]["reference"]["steps"] == 2 * 2
