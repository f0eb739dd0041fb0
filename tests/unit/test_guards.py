"""The first-step checks (`distrib/_guards.py`): misuse that used to train silently wrong now raises, and
correct use stays quiet (DistribWarning is an error in this test suite)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distrib import accumulate, backward, distributed, prepare
from distrib.errors import PrepareError, TrainingError


def _data(n: int = 16) -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randn(n, 1)), batch_size=4)


def _loop(model, optimizer, loader, *, raw_backward: bool = False, scheduler=None) -> None:
    for x, y in loader:
        with accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward() if raw_backward else backward(loss)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()


def test_an_optimizer_of_another_model_is_named_at_the_first_step():
    with distributed(cpu=True):
        model, other = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        model, optimizer, loader = prepare(model, torch.optim.SGD(other.parameters(), lr=0.1), _data())
        with pytest.raises(PrepareError, match="holds none of the parameters of the prepared model"):
            _loop(model, optimizer, loader)


def test_an_unprepared_optimizer_under_accumulation_is_an_error():
    with distributed(cpu=True, gradient_accumulation_steps=2):
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, loader = prepare(model, _data())
        with pytest.raises(
            TrainingError, match="optimizer updates a prepared model but was not passed to prepare"
        ):
            _loop(model, optimizer, loader)


def test_an_unprepared_scheduler_under_accumulation_is_an_error():
    with distributed(cpu=True, gradient_accumulation_steps=2):
        model = torch.nn.Linear(4, 1)
        model, optimizer, loader = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        with pytest.raises(TrainingError, match=r"LambdaLR scheduler .* was not passed to prepare"):
            _loop(model, optimizer, loader, scheduler=scheduler)


def test_loss_backward_under_accumulation_is_an_error_and_fine_without():
    with distributed(cpu=True, gradient_accumulation_steps=2):
        model = torch.nn.Linear(4, 1)
        model, optimizer, loader = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())
        with pytest.raises(TrainingError, match=r"replace\s+loss.backward\(\) by distrib.backward\(loss\)"):
            _loop(model, optimizer, loader, raw_backward=True)
    with distributed(cpu=True):  # one micro-batch per step, no loss scaling: loss.backward() is exact
        model = torch.nn.Linear(4, 1)
        model, optimizer, loader = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), _data())
        _loop(model, optimizer, loader, raw_backward=True)


def test_correct_use_with_accumulation_and_a_scheduler_is_quiet_and_the_watch_goes_away():
    from torch.optim import optimizer as optimizer_module

    hooks = optimizer_module._global_optimizer_pre_hooks
    with distributed(cpu=True, gradient_accumulation_steps=2) as ctx:
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        model, optimizer, loader, scheduler = prepare(model, optimizer, _data(64), scheduler)
        assert len(hooks) == 1, "prepare() watches for optimizers that were not prepared"
        for _ in range(3):
            _loop(model, optimizer, loader, scheduler=scheduler)
        assert ctx.optimizer_steps == 24
        assert len(hooks) == 0, "the watch removes itself after the first optimizer steps"
    assert len(hooks) == 0
