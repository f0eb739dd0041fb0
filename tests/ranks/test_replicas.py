"""The replica divergence check (`check_replicas_every`): silent on clean runs, loud on every rank when a
rank skips an optimizer step, a scheduler steps twice on one rank, a buffer is not synchronised, or the
ranks were seeded differently (DDP broadcasts a trained model's weights from rank 0 when it wraps it, so
different seeds show in a frozen model, which it does not wrap)."""

from __future__ import annotations

import torch

from distrib import backward, distributed, prepare
from distrib.errors import ReplicaDivergenceError
from distrib.testing import run_ranks


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
        self.register_buffer("offset", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.offset


def _run(fault: str, steps: int, every: int) -> str:
    with distributed(
        cpu=True, check_replicas_every=every, ddp={"broadcast_buffers": fault != "buffer"}
    ) as ctx:
        torch.manual_seed(1 + (ctx.rank if fault == "seed" else 0))
        model = Net()
        if fault == "buffer":
            model.offset.fill_(ctx.rank)
        frozen = torch.nn.Linear(4, 4).requires_grad_(False)  # DDP does not broadcast a model it skips
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.99)
        model, frozen, optimizer, scheduler = prepare(model, frozen, optimizer, scheduler)
        generator = torch.Generator().manual_seed(100 + ctx.rank)
        try:
            for step in range(steps):
                x = torch.randn(8, 4, generator=generator)
                backward(model(frozen(x)).square().mean())
                if not (fault == "skip" and ctx.rank == 1 and step == 3):
                    optimizer.step()
                scheduler.step()
                if fault == "scheduler" and ctx.rank == 0 and step == 2:
                    scheduler.step()
                optimizer.zero_grad()
        except ReplicaDivergenceError as exc:
            return str(exc)
        return f"clean after {ctx.optimizer_steps} steps"


def test_a_thousand_clean_steps_raise_nothing():
    assert run_ranks(_run, 2, "none", 1000, 10, timeout=300) == ["clean after 1000 steps"] * 2


def test_each_kind_of_divergence_is_named_on_every_rank():
    expected = {
        "skip": "'optimizer steps' is not the same on every rank (rank(s) 0 vs rank(s) 1)",
        "scheduler": "'learning rate of optimizer 0, group 0'",
        "buffer": "'model 0: offset'",
        "seed": "'model 1: weight'",
    }
    for fault, name in expected.items():
        messages = run_ranks(_run, 2, fault, 12, 5, timeout=300)
        for message in messages:
            assert name in message and "replicas diverged at optimizer step" in message, (fault, message)
        assert messages[0] == messages[1], "every rank reports the same divergence"


def test_three_ranks_name_the_one_that_differs():
    messages = run_ranks(_run, 3, "skip", 12, 5, timeout=300)
    assert all("differing: rank(s) 1; agreeing: rank(s) 0, 2" in m for m in messages), messages
