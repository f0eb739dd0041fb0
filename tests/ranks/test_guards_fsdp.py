"""Under FSDP2 an optimizer built before prepare() holds parameters FSDP replaced: stepping it trained
nothing, silently. Now every rank raises at the first step, and an optimizer prepared in an earlier call
than its model is re-pointed and trains."""

from __future__ import annotations

import torch

from distrib import backward, distributed, prepare
from distrib.errors import PrepareError
from distrib.testing import run_ranks


def _stale_optimizer() -> str:
    with distributed(strategy="fsdp", cpu=True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the raw model
        model = prepare(model)  # the optimizer is not passed
        backward(model(torch.randn(2, 4)).sum())
        try:
            optimizer.step()
        except PrepareError as exc:
            return str(exc)
        return "no error"


def _optimizer_prepared_first() -> float:
    with distributed(strategy="fsdp", cpu=True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        optimizer = prepare(torch.optim.SGD(model.parameters(), lr=0.1))
        model = prepare(model)
        before = [p.detach().full_tensor().clone() for p in model.parameters()]
        backward(model(torch.randn(2, 4)).sum())
        optimizer.step()
        after = [p.detach().full_tensor() for p in model.parameters()]
        return max(float((a - b).abs().max()) for a, b in zip(after, before))


def test_a_stale_optimizer_under_fsdp_fails_on_every_rank():
    for message in run_ranks(_stale_optimizer, 2, timeout=240):
        assert "holds the parameters the model had before prepare()" in message
        assert "model, optimizer = prepare(model, optimizer)" in message


def test_an_optimizer_prepared_before_its_model_is_repointed_and_trains():
    moved = run_ranks(_optimizer_prepared_first, 2, timeout=240)
    assert all(m > 1e-4 for m in moved), moved


def _differently_seeded() -> list[float]:
    with distributed(strategy="fsdp", cpu=True) as ctx:
        torch.manual_seed(ctx.rank)  # each rank initialises its own copy differently
        model = prepare(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)))
        return [float(v) for p in model.parameters() for v in p.detach().full_tensor().reshape(-1)[:4]]


def test_fsdp_shards_rank_0s_initial_weights_like_ddp():
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    expected = [float(v) for p in reference.parameters() for v in p.detach().reshape(-1)[:4]]
    assert run_ranks(_differently_seeded, 2, timeout=240) == [expected, expected]
