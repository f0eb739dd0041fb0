"""A preemption signal in one process: acted on at the next batch of a prepared dataloader, and a loop
without one is told so instead of waiting in silence for a save that never comes."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distrib import distributed, prepare


def test_a_signal_outside_a_prepared_loader_says_the_loop_will_not_stop(capfd):
    with distributed(cpu=True):
        os.kill(os.getpid(), signal.SIGUSR1)
    err = capfd.readouterr().err
    assert "received SIGUSR1" in err
    assert "no prepared dataloader is iterating now" in err and "prepare() your DataLoader" in err


def test_a_signal_inside_a_prepared_loop_exits_75_at_the_next_batch(capfd, tmp_path):
    seen = []
    with pytest.raises(SystemExit) as stopped, distributed(cpu=True, project_dir=str(tmp_path)):
        loader = prepare(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2))
        for (x,) in loader:
            seen.append(x.tolist())
            if len(seen) == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
    assert stopped.value.code == 75
    assert seen == [[0.0, 1.0], [2.0, 3.0]]  # stopped before the third batch
    assert "no prepared dataloader" not in capfd.readouterr().err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000000"]


def test_handlers_are_restored_when_the_scope_closes():
    before = signal.getsignal(signal.SIGUSR1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with distributed(cpu=True):
            assert signal.getsignal(signal.SIGUSR1) is not before
    assert signal.getsignal(signal.SIGUSR1) is before


def test_preemption_exit_code_none_leaves_the_signals_alone():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with distributed(cpu=True, preemption_exit_code=None) as ctx:
        assert {s: signal.getsignal(s) for s in before} == before
        assert "preemption" not in ctx.state.extensions


def test_where_a_loader_is_counts_batches_of_this_iteration_not_of_the_epoch():
    from distrib._preemption import _where
    from distrib._runtime import current

    with distributed(cpu=True):
        first = prepare(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2))
        second = prepare(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2))
        runtime = current("test")
        # a loader resumed mid-epoch may start at different batch counts on different ranks
        first.start_batch, first.batches_yielded = 1, 3
        at_one = _where(runtime, first)
        first.start_batch, first.batches_yielded = 0, 2
        assert _where(runtime, first) == at_one
        second.start_batch, second.batches_yielded = 0, 2
        assert _where(runtime, second) != at_one, "another loader at the same batch is somewhere else"
