"""Training options users port from Accelerate: compile for every strategy, sync_each_batch,
trigger_sync_in_backward, join_uneven_inputs; on real processes where ranks matter."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distrib import (
    CompileOptions,
    Settings,
    accumulate,
    backward,
    distributed,
    join_uneven_inputs,
    prepare,
    reduce,
    trigger_sync_in_backward,
)
from distrib.errors import SettingsError, TrainingError
from distrib.testing import run_ranks


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _compiled_training(settings: dict[str, Any]) -> dict[str, Any]:
    import torch._dynamo

    torch._dynamo.reset()
    with distributed(cpu=True, **settings) as ctx:
        torch.manual_seed(0)
        model = Stack()
        model, optimizer = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        inner = model.module if hasattr(model, "module") else model
        compiled = [name for name, m in inner.named_modules() if m._compiled_call_impl is not None]
        generator = torch.Generator().manual_seed(ctx.rank)
        for _ in range(3):
            backward(model(torch.randn(8, 4, generator=generator)).square().mean())
            optimizer.step()
            optimizer.zero_grad()
        return {
            "compiled": compiled,
            "keys": sorted(inner.state_dict())[:2],
            "weight": inner.head.weight.detach().clone(),
        }


@pytest.mark.parametrize("regional", [False, True])
def test_compile_trains_like_eager_on_two_processes(regional: bool):
    eager = run_ranks(_compiled_training, 2, {}, timeout=300)
    compiled = run_ranks(
        _compiled_training,
        2,
        {"compile": CompileOptions(backend="aot_eager", regional=regional)},
        timeout=300,
    )
    expected = ["layers.0", "layers.1", "layers.2"] if regional else [""]
    for out in compiled:
        assert out["compiled"] == expected
        assert out["keys"] == ["head.bias", "head.weight"], "in-place compile keeps the state-dict names"
    torch.testing.assert_close(compiled[0]["weight"], eager[0]["weight"], rtol=1e-5, atol=1e-6)


def test_compile_setting_forms_and_errors():
    assert Settings(compile=True).compile is True
    assert Settings(compile={"mode": "max-autotune", "regional": True}).compile == CompileOptions(
        mode="max-autotune", regional=True
    )
    with pytest.raises(SettingsError, match=r"CompileOptions\.mode='fastest'"):
        CompileOptions(mode="fastest")


def _micro_steps_with_sync(settings: dict[str, Any], trigger: bool) -> list[bool]:
    """Whether each micro-batch's backward all-reduced (read from the DDP reducer's counters)."""
    synced: list[bool] = []
    with distributed(cpu=True, gradient_accumulation_steps=4, **settings):
        model = torch.nn.Linear(4, 1)
        loader = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=2)
        model, optimizer, loader = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
        for (x,) in loader:
            with accumulate(model):
                loss = model(x).sum()
                if trigger:
                    with trigger_sync_in_backward(model):
                        backward(loss)
                else:
                    backward(loss)
                # after an all-reduce every rank holds the same (averaged, accumulated) gradient
                synced.append(_same_on_every_rank(model.module.weight.grad))
                optimizer.step()
                optimizer.zero_grad()
    return synced


def _same_on_every_rank(tensor: torch.Tensor) -> bool:
    import torch.distributed as dist

    everyone = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, tensor.contiguous())
    return all(torch.equal(everyone[0], t) for t in everyone)


@pytest.mark.parametrize(
    ("settings", "trigger", "expected"),
    [
        ({}, False, [False, False, False, True]),
        ({"sync_each_batch": True}, False, [True] * 4),
        ({}, True, [True] * 4),
    ],
)
def test_sync_each_batch_and_trigger_sync_in_backward(settings, trigger, expected):
    for synced in run_ranks(_micro_steps_with_sync, 2, settings, trigger, timeout=240):
        assert synced == expected


def _uneven(join: bool) -> dict[str, Any]:
    with distributed(cpu=True, even_batches=False) as ctx:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        data = TensorDataset(torch.randn(10, 4), torch.randn(10, 1))  # 3 batches on rank 0, 2 on rank 1
        model, optimizer, loader = prepare(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=2)
        )
        batches = 0
        with join_uneven_inputs(model):
            for x, y in loader:
                backward(torch.nn.functional.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
                batches += 1
        return {"rank": ctx.rank, "batches": batches, "weight": model.module.weight.detach().clone()}


def test_join_uneven_inputs_lets_the_longer_rank_finish():
    out = run_ranks(_uneven, 2, True, timeout=240)
    assert [o["batches"] for o in out] == [3, 2]
    torch.testing.assert_close(out[0]["weight"], out[1]["weight"])  # the replicas stayed identical


def _ragged_evaluation() -> dict[str, Any]:
    # 3 ranks, 9 samples, batch 2: ranks see 2, 2 and 1 batches; no collective per batch, one at the end
    with distributed(cpu=True, even_batches=False) as ctx:
        loader = prepare(DataLoader(TensorDataset(torch.arange(9.0)), batch_size=2))
        batches, total = 0, torch.zeros(1)
        for _epoch in range(2):
            for (x,) in loader:
                batches += 1
                total += x.sum()
        return {"rank": ctx.rank, "batches": batches, "total": reduce(total, "sum").item()}


def test_ragged_batches_without_collectives_end_in_step():
    # the loaders agree on preemption only at the boundaries every rank reaches, so the ranks that ran
    # longer do not leave a collective behind that the final reduce would be matched with
    out = run_ranks(_ragged_evaluation, 3, timeout=240)
    assert [o["batches"] for o in out] == [4, 4, 2]
    assert all(o["total"] == 2 * sum(range(9)) for o in out)


def _join_under_fsdp() -> str:
    with distributed(strategy="fsdp", cpu=True):
        model = prepare(torch.nn.Linear(4, 1))
        try:
            with join_uneven_inputs(model):
                pass
        except TrainingError as exc:
            return str(exc)
        return "no error"


def test_join_uneven_inputs_under_fsdp_is_a_clear_error():
    for message in run_ranks(_join_under_fsdp, 2, timeout=240):
        assert "needs models prepared under strategy='ddp'" in message
