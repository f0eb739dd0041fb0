"""Resume exactness on 1, 2 and 3 ranks at every kind of stop point, the user's generator across ranks,
the resume fingerprint stopping every rank, batch samplers given as `sampler=` (issue 16), iterable
streams and dispatch from rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, TensorDataset

from distrib import accumulate, backward, distributed, gather, gather_for_metrics, prepare, unwrap_model
from distrib.checkpointing import load_state, register_for_checkpointing, save_state
from distrib.testing import run_ranks


class Indexed(Dataset):  # type: ignore[type-arg]
    """Sample i is (i, x_i, y_i): the index travels with the batch, so every step can log it."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 2, dtype=torch.float64, generator=g)
        self.y = torch.randn(n, 1, dtype=torch.float64, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


class EpochCounter:
    def __init__(self) -> None:
        self.epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]


def _run(
    workdir: str, config: dict[str, Any], stop_at: int | None = None, resume: bool = False
) -> dict[str, Any]:
    """The user's loop, driven by their own epoch counter; logs every micro-step's global indices."""
    settings = {k: config[k] for k in ("gradient_accumulation_steps", "even_batches", "split_batches")}
    with distributed(project_dir=workdir, seed=0, **settings) as ctx:
        torch.manual_seed(0)
        model = nn.Linear(2, 1).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = DataLoader(Indexed(config["n"]), batch_size=config["batch_size"], shuffle=True)
        model, optimizer, loader = prepare(model, optimizer, loader)
        counter = EpochCounter()
        register_for_checkpointing(counter)
        if resume:
            assert load_state() is not None
        log, agree, micro = [], True, 0
        while counter.epoch < config["epochs"]:
            for idx, x, y in loader:
                agree = agree and loader.epoch == counter.epoch
                with accumulate(model):
                    backward(nn.functional.mse_loss(model(x), y))
                    optimizer.step()
                    optimizer.zero_grad()
                log.append(gather(idx).tolist())
                micro += 1
                if micro == stop_at:
                    save_state()
                    return {"log": log}
            counter.epoch += 1
        params = {k: v.clone() for k, v in unwrap_model(model).state_dict().items()}
        return {"log": log, "params": params, "agree": agree, "steps": ctx.state.optimizer_steps}


def _stop_points(workdir: str, configs: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    with distributed():  # the outer scope owns the process group; every run opens its own scope in it
        for name, config in configs.items():
            reference = _run(f"{workdir}/{name}/reference", config)
            found = problems.setdefault(name, [])
            assert reference["agree"]
            for stop in range(1, len(reference["log"]) + 1):
                first = _run(f"{workdir}/{name}/stop{stop}", config, stop_at=stop)
                rest = _run(f"{workdir}/{name}/stop{stop}", config, resume=True)
                if first["log"] + rest["log"] != reference["log"]:
                    found.append(f"stop {stop}: the data differs from the uninterrupted run")
                if not all(torch.equal(rest["params"][k], v) for k, v in reference["params"].items()):
                    found.append(f"stop {stop}: parameters differ")
                if not rest["agree"] or rest["steps"] != reference["steps"]:
                    found.append(f"stop {stop}: epoch counters or optimizer steps disagree")
            found.append(f"checked {len(reference['log'])} stop points")
    return problems


def _configs(world: int) -> dict[str, dict[str, Any]]:
    common = {"n": 13, "epochs": 2, "even_batches": True}
    return {
        # 13 samples in global batches of 2*world: the last one padded; windows of 2 micro-batches
        "accumulation": {**common, "batch_size": 2, "gradient_accumulation_steps": 2, "split_batches": False},
        "split_batches": {
            **common,
            "batch_size": 2 * world,
            "gradient_accumulation_steps": 1,
            "split_batches": True,
        },
    }


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_stop_point_resumes_exactly(tmp_path: Path, world: int) -> None:
    """First and last batch of each epoch, inside and at the end of an accumulation window, a padded final
    batch, split_batches, the last step of the run: each resumed run sees exactly the rest of the data and
    ends bit-identical, with the loader's epoch equal to the user's counter (and no fingerprint alarm)."""
    outcomes = run_ranks(_stop_points, world, str(tmp_path), _configs(world), timeout=600)
    for problems in outcomes[0].values():
        assert len(problems) == 1 and problems[0].startswith("checked"), problems


def _plain_loop(seed: int, batch_size: int, epochs: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(Indexed(40), batch_size=batch_size, shuffle=True, generator=g)
    for _ in range(epochs):
        for _, x, y in loader:
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.state_dict(), g.get_state()


def _generator_worker() -> dict[str, Any]:
    with distributed() as ctx:
        g = torch.Generator().manual_seed(11)
        user = DataLoader(Indexed(40), batch_size=4, shuffle=True, generator=g)
        torch.manual_seed(0)
        model = nn.Linear(2, 1).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer, loader = prepare(model, optimizer, user)
        orders = []
        for _ in range(2):
            order = []
            for idx, x, y in loader:
                backward(nn.functional.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
                order += gather(idx).tolist()
            orders.append(order)
        params = unwrap_model(model).state_dict()
        plain, plain_state = _plain_loop(11, 4 * ctx.world_size, 2)
        mismatched = None
        try:
            prepare(DataLoader(Indexed(8), shuffle=True, generator=torch.Generator().manual_seed(ctx.rank)))
        except Exception as e:  # reported to the test
            mismatched = f"{type(e).__name__}: {e}"
        return {
            "difference": max((params[k] - plain[k]).abs().max().item() for k in plain),
            "same_generator": user.sampler.generator is g,
            "same_state": torch.equal(g.get_state(), plain_state),
            "orders": orders,
            "mismatched": mismatched,
        }


def test_two_ranks_shuffled_by_the_users_generator_match_the_plain_loop() -> None:
    outcomes = run_ranks(_generator_worker, 2, timeout=240)
    for out in outcomes:
        assert out["difference"] < 1e-6, out["difference"]
        assert out["same_generator"] and out["same_state"], "the user's generator is used, not replaced"
        assert out["orders"] == outcomes[0]["orders"] and out["orders"][0] != out["orders"][1]
        assert sorted(out["orders"][0]) == list(range(40))
        assert out["mismatched"] is not None and "PrepareError" in out["mismatched"]
        assert "different states on different ranks" in out["mismatched"]


def _broken_restore_worker(workdir: str) -> str:
    from distrib._data import order as order_module

    def train(resume: bool) -> list[Any]:
        with distributed(project_dir=workdir) as ctx:
            g = torch.Generator().manual_seed(5)
            loader = prepare(
                DataLoader(TensorDataset(torch.arange(24)), batch_size=2, shuffle=True, generator=g)
            )
            if resume:
                if ctx.rank == 1:  # one rank's sampler restore is broken: its generator is not put back
                    order_module.EpochOrder.restore = lambda self, states: None  # type: ignore[method-assign]
                load_state()
                return [x.tolist() for (x,) in loader]
            for _ in loader:
                pass
            it = iter(loader)
            next(it), next(it)
            save_state()
            return []

    train(resume=False)
    try:
        train(resume=True)
    except Exception as e:  # reported to the test
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_a_broken_sampler_restore_stops_every_rank(tmp_path: Path) -> None:
    outcomes = run_ranks(_broken_restore_worker, 2, str(tmp_path), timeout=240)
    for message in outcomes:
        assert message.startswith("ResumeMismatchError"), message
        assert "rank(s) [1] differ" in message
    assert "this rank's batch matched" in outcomes[0] and "expected [" in outcomes[1]


def _batch_sampler_worker(workdir: str) -> dict[str, Any]:
    data = TensorDataset(torch.arange(11))
    sampler = BatchSampler(RandomSampler(data), 3, drop_last=False)
    out: dict[str, Any] = {}
    with distributed(project_dir=workdir, seed=1) as ctx:
        loader = prepare(DataLoader(data, sampler=sampler, batch_size=None))
        out["mine"] = [x.tolist() for (x,) in loader]
        seen = []
        for (x,) in loader:
            seen += gather_for_metrics(x).tolist()
        out["seen"] = seen
        loader.set_epoch(0)
        it = iter(loader)
        next(it)
        save_state()
        del it
        out["rank"] = ctx.rank
    with distributed(project_dir=workdir, seed=1):
        loader = prepare(DataLoader(data, sampler=sampler, batch_size=None))
        load_state()
        out["resumed"] = [x.tolist() for (x,) in loader]
    return out


def test_a_batch_sampler_given_as_sampler_is_dealt_by_whole_batches(tmp_path: Path) -> None:
    outcomes = run_ranks(_batch_sampler_worker, 2, str(tmp_path), timeout=240)
    batches = [b for step in zip(outcomes[0]["mine"], outcomes[1]["mine"]) for b in step]
    assert [len(b) for b in batches] == [3, 3, 3, 2], "rank r takes batches r, r+2, ..."
    assert sorted(v for b in batches for v in b) == list(range(11))
    for out in outcomes:
        assert sorted(out["seen"]) == list(range(11)) and len(out["seen"]) == 11, (
            "gather_for_metrics is exact"
        )
        assert out["resumed"] == out["mine"][1:]


class Stream(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        yield from (torch.tensor([i]) for i in range(self.n))


def _stream_worker(workdir: str, dispatch: bool, save: bool) -> list[int]:
    with distributed(project_dir=workdir, dispatch_batches=dispatch):
        loader = prepare(DataLoader(Stream(30), batch_size=2))
        if not save:
            load_state()
            return [v for x in loader for v in gather(x).view(-1).tolist()]
        it = iter(loader)
        seen = [v for _ in range(3) for v in gather(next(it)).view(-1).tolist()]
        save_state()
        return seen


@pytest.mark.parametrize("dispatch", [False, True])
def test_an_iterable_stream_resumes_on_another_number_of_ranks(tmp_path: Path, dispatch: bool) -> None:
    before = run_ranks(_stream_worker, 2, str(tmp_path), dispatch, True, timeout=240)[0]
    after = run_ranks(_stream_worker, 3, str(tmp_path), dispatch, False, timeout=240)[0]
    assert before == list(range(12)), "3 global batches of 2 x 2"
    # 3 ranks x 2 per rank: the rest of the same stream; the last global batch (18 samples left) is whole
    assert after == list(range(12, 30))


class FailsAt(Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> int:
        if i == 9:
            raise ValueError("sample 9 is corrupt")
        return i


def _dispatch_failure_worker() -> str:
    with distributed(dispatch_batches=True):
        loader = prepare(DataLoader(FailsAt(), batch_size=2))
        try:
            for _ in loader:
                pass
        except Exception as e:  # reported to the test
            return f"{type(e).__name__}: {e}"
    return "no error"


def test_a_failure_on_the_dispatching_rank_reaches_every_rank() -> None:
    outcomes = run_ranks(_dispatch_failure_worker, 2, timeout=120)
    assert outcomes[0] == "ValueError: sample 9 is corrupt"
    assert outcomes[1].startswith("DataError: rank 0 failed to load the next batch (ValueError: sample 9")


class GlobalShuffle(torch.utils.data.Sampler[int]):
    """A custom sampler drawing from the global torch generator (no generator attribute of its own)."""

    def __init__(self, n: int, private: bool = False) -> None:
        import os
        import random

        self.n = n
        self.private = random.Random(os.urandom(8)) if private else None

    def __iter__(self):
        if self.private is not None:
            order = list(range(self.n))
            self.private.shuffle(order)
            return iter(order)
        return iter(torch.randperm(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def _custom_sampler_worker() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distributed(seed=3):  # the seed setting seeds the global generators alike on every rank
        loader = prepare(DataLoader(TensorDataset(torch.arange(16)), batch_size=2, sampler=GlobalShuffle(16)))
        out["seen"] = sorted(v for (x,) in loader for v in gather(x).tolist())
    with distributed():
        loader = prepare(
            DataLoader(TensorDataset(torch.arange(16)), batch_size=2, sampler=GlobalShuffle(16, True))
        )
        try:
            list(loader)
            out["private"] = "no error"
        except Exception as e:  # reported to the test
            out["private"] = f"{type(e).__name__}: {e}"
    return out


def test_ranks_that_draw_different_orders_stop_instead_of_overlapping() -> None:
    for out in run_ranks(_custom_sampler_worker, 2, timeout=240):
        assert out["seen"] == list(range(16)), "a sampler seeded alike on every rank is dealt exactly"
        assert out["private"].startswith("DataError: the ranks drew different sample orders"), out["private"]
