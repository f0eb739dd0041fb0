"""Where the ranks agree on a preemption signal: at every optimizer-step boundary while training, and only
every few batches of a pass with no optimizer step (evaluation), where a per-batch all-reduce would cost
more than the batch; a signal there still stops every rank at the same batch."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from distrib import distributed, gather, prepare
from distrib._preemption import MAX_IDLE_EVERY
from distrib.testing import RanksFailed, run_ranks

BATCHES = 300


def _counting_all_reduces() -> list[int]:
    calls = [0]
    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted  # the agreement calls torch.distributed.all_reduce by attribute
    return calls


def _evaluation(project: str, signal_at: int) -> dict[str, Any]:
    calls = _counting_all_reduces()
    seen = 0
    try:
        with distributed(cpu=True, project_dir=project) as ctx:
            loader = prepare(DataLoader(TensorDataset(torch.arange(2.0 * BATCHES)), batch_size=1))
            for _ in loader:
                seen += 1
                if seen == signal_at and ctx.rank == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
            rows = gather(torch.tensor([seen])).tolist()
            return {"code": None, "seen": seen, "all_reduces": calls[0], "rows": rows}
    except SystemExit as stop:
        return {"code": stop.code, "seen": seen, "all_reduces": calls[0]}


def test_an_evaluation_pass_agrees_every_few_batches_not_every_batch(tmp_path: Path):
    out = run_ranks(_evaluation, 2, str(tmp_path), -1, timeout=240)
    assert [o["code"] for o in out] == [None, None]
    assert [o["seen"] for o in out] == [BATCHES, BATCHES]
    # the gap between agreements doubles from one batch up to a cadence the ranks agree on from their batch
    # times (at most MAX_IDLE_EVERY batches)
    assert all(o["all_reduces"] < BATCHES // 4 for o in out), out


def test_a_signal_during_evaluation_stops_every_rank_at_the_same_batch(tmp_path: Path):
    out = run_ranks(_evaluation, 2, str(tmp_path), 20, timeout=240)
    assert [o["code"] for o in out] == [75, 75], out
    assert out[0]["seen"] == out[1]["seen"], "every rank stopped at the same batch"
    assert 20 <= out[0]["seen"] <= 20 + 2 * MAX_IDLE_EVERY + 1, out
    checkpoints = [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(checkpoints) == 1, checkpoints


def _training_then_evaluation(project: str) -> dict[str, Any]:
    calls = _counting_all_reduces()
    with distributed(cpu=True, project_dir=project):
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        train = DataLoader(TensorDataset(torch.randn(40, 1)), batch_size=2)
        evaluation = DataLoader(TensorDataset(torch.randn(400, 1)), batch_size=2)
        model, optimizer, train, evaluation = prepare(model, optimizer, train, evaluation)
        for (x,) in train:
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        in_training = calls[0]
        with torch.no_grad():
            for (x,) in evaluation:
                model(x)
        return {"training": in_training, "evaluation": calls[0] - in_training}


def test_training_agrees_at_every_step_and_evaluation_seldom(tmp_path: Path):
    for out in run_ranks(_training_then_evaluation, 2, str(tmp_path), timeout=240):
        # 10 batches per rank, one step each: an agreement before each batch and one when the loader ends
        assert out["training"] == 11, out
        # 100 batches: the gap doubles from 1 up to the agreed cadence
        assert 3 <= out["evaluation"] < 100 // 4, out


def _evaluation_on_rank_0_only() -> None:
    with distributed(cpu=True, stall_timeout=60) as ctx:
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train = DataLoader(TensorDataset(torch.randn(32, 2)), batch_size=2)
        evaluation = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=2)
        model, optimizer, train, evaluation = prepare(model, optimizer, train, evaluation)
        for _ in range(2):
            for (x,) in train:
                model(x).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
            if ctx.rank == 0:  # the misuse: a prepared loader iterated by one rank
                with torch.no_grad():
                    for (x,) in evaluation:
                        model(x)


def test_a_prepared_loader_iterated_on_one_rank_is_named_not_a_gloo_abort():
    with pytest.raises(RanksFailed) as failed:
        run_ranks(_evaluation_on_rank_0_only, 2, timeout=240)
    text = str(failed.value)
    assert "CollectiveMismatchError: the ranks' prepared dataloaders are out of step" in text, text
    assert "on rank 0, prepared dataloader #1" in text and "iterated on some ranks only" in text


def _ragged_training_then_evaluation() -> int:
    from distrib import join_uneven_inputs

    with distributed(cpu=True, even_batches=False, stall_timeout=60):
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        train = DataLoader(TensorDataset(torch.randn(3, 1)), batch_size=1)  # rank 0: 2 batches, rank 1: 1
        evaluation = DataLoader(TensorDataset(torch.randn(40, 1)), batch_size=1)
        model, optimizer, train, evaluation = prepare(model, optimizer, train, evaluation)
        with join_uneven_inputs(model):
            for (x,) in train:  # rank 0 steps once more than rank 1, in the ragged tail
                model(x).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
        seen = 0
        with torch.no_grad():
            for (x,) in evaluation:
                model(x)
                seen += 1
        return seen


def test_different_step_counts_in_a_ragged_tail_do_not_put_the_agreements_out_of_step():
    # each rank decides where to agree from its own optimizer steps; after a ragged tail they differ, so
    # the loader's end makes the next boundary agree everywhere
    assert run_ranks(_ragged_training_then_evaluation, 2, timeout=240) == [20, 20]
