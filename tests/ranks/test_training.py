"""Training maths on real processes: equivalence across world sizes, accumulation, sync counts, errors."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distrib.testing import run_ranks

N, GLOBAL_BATCH, STEPS_PER_EPOCH = 32, 8, 4


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g)
    return TensorDataset(x, x @ torch.randn(6, 1, generator=g) + 0.1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _train(settings: dict, batch_size: int, epochs: int = 2, count_syncs: bool = False) -> dict:
    from distrib import accumulate, backward, distributed, prepare

    with distributed(**settings) as ctx:
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        loader = DataLoader(_data(), batch_size=batch_size)
        model, optimizer, loader, scheduler = prepare(model, optimizer, loader, scheduler)
        syncs = [0]
        if count_syncs and hasattr(model, "register_comm_hook"):

            def hook(state, bucket):
                syncs[0] += 1
                fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
                return fut.then(lambda f: f.value()[0] / ctx.world_size)

            model.register_comm_hook(None, hook)
        steps = 0
        for _ in range(epochs):
            for x, y in loader:
                with accumulate(model):
                    backward(torch.nn.functional.mse_loss(model(x), y))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    steps += int(ctx.sync_gradients)
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        return {"params": params, "steps": steps, "syncs": syncs[0], "lr": scheduler.get_last_lr()[0]}


def _train_worker(settings: dict, batch_size: int, count_syncs: bool = False) -> dict:
    return _train(settings, batch_size, count_syncs=count_syncs)


def test_same_parameters_on_1_2_and_4_processes_with_split_batches():
    reference = _train({}, GLOBAL_BATCH)
    for world in (2, 4):
        for out in run_ranks(_train_worker, world, {"split_batches": True}, GLOBAL_BATCH, timeout=120):
            torch.testing.assert_close(out["params"], reference["params"], rtol=1e-5, atol=1e-6)
            assert out["steps"] == reference["steps"] == 2 * STEPS_PER_EPOCH


def test_per_process_batches_match_a_larger_single_batch():
    reference = _train({}, GLOBAL_BATCH)
    for out in run_ranks(_train_worker, 2, {}, GLOBAL_BATCH // 2, timeout=120):
        torch.testing.assert_close(out["params"], reference["params"], rtol=1e-5, atol=1e-6)


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    reference = _train({}, GLOBAL_BATCH)
    accumulated = _train({"gradient_accumulation_steps": 4}, GLOBAL_BATCH // 4)
    torch.testing.assert_close(accumulated["params"], reference["params"], rtol=1e-5, atol=1e-6)
    assert accumulated["steps"] == reference["steps"]
    assert accumulated["lr"] == pytest.approx(reference["lr"]), "the scheduler steps once per optimizer step"


def test_accumulation_window_closes_at_the_end_of_an_uneven_epoch():
    # 32 samples / batch 4 = 8 micro-batches per epoch, windows of 3: 3 + 3 + 2 (the short last window)
    out = _train({"gradient_accumulation_steps": 3}, 4, epochs=1)
    assert out["steps"] == 3
    assert out["lr"] == pytest.approx(0.05 * 0.9**3)


def test_gradient_syncs_per_optimizer_step_do_not_depend_on_accumulation():
    plain = run_ranks(_train_worker, 2, {}, 4, True, timeout=120)[0]
    accumulated = run_ranks(_train_worker, 2, {"gradient_accumulation_steps": 2}, 2, True, timeout=120)[0]
    assert plain["steps"] == accumulated["steps"] > 0
    assert plain["syncs"] / plain["steps"] == accumulated["syncs"] / accumulated["steps"] == 1
    torch.testing.assert_close(plain["params"], accumulated["params"], rtol=1e-5, atol=1e-6)


def _bf16_worker() -> dict:
    from distrib import autocast, distributed, prepare, unwrap_model

    with distributed(mixed_precision="bf16") as ctx:
        net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        inside: list[torch.dtype] = []  # the dtype inside the forward: outputs are cast back to float32
        net[0].register_forward_hook(lambda module, args, output: inside.append(output.dtype))
        model = prepare(net)
        out = model(torch.randn(2, 4))
        with autocast():
            inner = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(4, 4))
        plain = unwrap_model(model, keep_autocast=False)
        plain_out = plain(torch.randn(2, 4))
        return {"out": out.dtype, "forward": inside, "inner": inner.dtype, "plain": plain_out.dtype,
                "strategy": ctx.strategy}  # fmt: skip


def test_bf16_autocast_with_fp32_outputs_on_two_processes():
    for out in run_ranks(_bf16_worker, 2, timeout=60):
        assert out == {
            "out": torch.float32,
            "forward": [torch.bfloat16, torch.float32],  # prepared: autocast; unwrapped: none
            "inner": torch.bfloat16,
            "plain": torch.float32,
            "strategy": "ddp",
        }


def test_prepare_errors_and_pass_through():
    from distrib import distributed, prepare
    from distrib.errors import PrepareError

    with distributed():
        with pytest.raises(PrepareError, match="wrap it in a DataLoader"):
            prepare(_data())
        with pytest.raises(PrepareError, match="not an instance"):
            prepare(torch.optim.SGD)
        with pytest.raises(PrepareError, match="at least one object"):
            prepare()
        marker = object()
        model = torch.nn.Linear(2, 2)
        prepared, same = prepare(model, marker)
        assert same is marker
        assert prepare(prepared) is prepared, "preparing twice is harmless"
        loader = prepare(DataLoader(_data(), batch_size=4))
        assert prepare(loader) is loader


def test_backward_on_a_non_scalar_is_a_clear_error():
    from distrib import backward, distributed
    from distrib.errors import TrainingError

    with distributed():
        loss = torch.ones(3, requires_grad=True) * 2
        with pytest.raises(TrainingError, match=r"scalar loss.*loss.mean\(\)"):
            backward(loss)
        backward(loss, gradient=torch.ones(3))


def test_clipping_and_skipped_step_flag():
    from distrib import (
        backward,
        clip_grad_norm_,
        clip_grad_value_,
        distributed,
        optimizer_step_was_skipped,
        prepare,
    )

    with distributed():
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = prepare(model, optimizer)
        backward(model(torch.full((4, 3), 100.0)).sum())
        norm = clip_grad_norm_(model.parameters(), max_norm=1.0)
        clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert norm > 1.0 and clipped == pytest.approx(1.0, rel=1e-4)
        clip_grad_value_(model.parameters(), 0.01)
        assert all(p.grad.abs().max() <= 0.01 for p in model.parameters())
        optimizer.step()
        assert optimizer_step_was_skipped() is False


def _sync_control_worker() -> dict:
    import distrib
    from distrib import backward, clip_grad_norm_, distributed, local_main_process_first, no_sync, prepare

    with distributed(split_batches=True):
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(_data(), batch_size=GLOBAL_BATCH)
        model, optimizer, loader = prepare(model, optimizer, loader)
        x, y = next(iter(loader))
        with no_sync(model):
            backward(torch.nn.functional.mse_loss(model(x), y))
        local = torch.cat([p.grad.flatten() for p in model.parameters()])
        optimizer.zero_grad()
        backward(torch.nn.functional.mse_loss(model(x), y))
        norm = clip_grad_norm_(model.parameters(), max_norm=1e-3)
        synced = torch.cat([p.grad.flatten() for p in model.parameters()])
        with local_main_process_first():  # no collective inside: the others wait at the door
            entered = time.monotonic()
        order = distrib.gather(torch.tensor([entered])).argsort()
        return {"local": local, "synced": synced, "norm": float(norm),
                "inner_is_plain": type(distrib.unwrap_model(model)) is torch.nn.Sequential,
                "first": int(order[0])}  # fmt: skip


def test_no_sync_clipping_and_unwrap_on_four_processes():
    results = run_ranks(_sync_control_worker, 4, timeout=120)
    # the reference: one process computing the full global batch's gradient norm
    model = _model()
    x, y = _data()[:GLOBAL_BATCH]
    torch.nn.functional.mse_loss(model(x), y).backward()
    full_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert not torch.allclose(results[0]["local"], results[1]["local"]), "no_sync keeps gradients local"
    for out in results:
        torch.testing.assert_close(out["synced"], results[0]["synced"])
        assert out["norm"] == pytest.approx(full_norm, rel=1e-5), "the norm is over the synchronised gradient"
        assert out["synced"].norm().item() == pytest.approx(1e-3, rel=1e-3)
        assert out["inner_is_plain"] and out["first"] == 0, "the local main process enters first"
