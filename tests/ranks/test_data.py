"""Dataloader sharding: pure cutting rules, then real prepared loaders on 2 and 4 ranks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from distrib.testing import run_ranks


def _loader_worker(sizes: tuple[int, ...], split: bool, batch_size: int) -> dict:
    return {n: _one_loader(n, split, batch_size) for n in sizes}


def _one_loader(n: int, split: bool, batch_size: int) -> dict:
    from distrib import distributed, gather, gather_for_metrics, prepare

    with distributed(split_batches=split) as ctx:
        data = TensorDataset(torch.arange(n))
        loader = prepare(DataLoader(data, batch_size=batch_size, shuffle=True))
        epochs = []
        for _ in range(2):
            order = []
            for (x,) in loader:
                assert x.device == ctx.device
                order.append(gather(x).tolist())
            epochs.append(order)
        evaluated = []
        eval_loader = prepare(DataLoader(data, batch_size=batch_size))
        for (x,) in eval_loader:
            evaluated += gather_for_metrics(x).tolist()
        objects = []
        for (x,) in eval_loader:
            objects += gather_for_metrics([f"s{i}" for i in x.tolist()])
        return {"len": len(loader), "epochs": epochs, "eval": evaluated, "objects": objects}


@pytest.mark.parametrize(("world", "split"), [(2, False), (2, True), (4, False), (4, True)])
def test_prepared_loader_shards_shuffles_and_gathers_exactly(world, split):
    batch_size = 4
    outputs = run_ranks(_loader_worker, world, (13, 16), split, batch_size, timeout=120)
    for n in (13, 16):
        per_rank = [out[n] for out in outputs]
        first = per_rank[0]
        per_step = batch_size if split else batch_size * world
        assert first["len"] == -(-n // per_step)
        assert all(r["epochs"] == first["epochs"] for r in per_rank), "ranks agree on the shuffled order"
        for order in first["epochs"]:
            flat = [i for step in order for i in step]
            assert sorted(set(flat)) == list(range(n)), "every sample appears each epoch"
            assert len(flat) == first["len"] * per_step
        assert first["epochs"][0] != first["epochs"][1], "a new epoch reshuffles"
        assert first["eval"] == list(range(n)), "gather_for_metrics returns exactly the dataset, in order"
        assert first["objects"] == [f"s{i}" for i in range(n)]


class _Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        yield from (torch.tensor([i]) for i in range(self.n))


def _iterable_worker(dispatch: bool) -> dict:
    from distrib import distributed, gather_for_metrics, prepare

    with distributed(dispatch_batches=dispatch):
        loader = prepare(DataLoader(_Stream(11), batch_size=2))
        seen, mine = [], []
        for x in loader:
            mine.append(x.view(-1).tolist())
            seen += gather_for_metrics(x).view(-1).tolist()
        return {"seen": seen, "mine": mine}


@pytest.mark.parametrize("dispatch", [False, True])
def test_iterable_datasets(dispatch):
    results = run_ranks(_iterable_worker, 2, dispatch, timeout=120)
    assert results[0]["seen"] == list(range(11))
    assert len(results[0]["mine"]) == len(results[1]["mine"]), "ranks step together"
    assert results[0]["mine"][0] == [0, 1] and results[1]["mine"][0] == [2, 3]


class _Counting(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.calls += 1
        return i


def _resume_worker() -> dict:
    from distrib import distributed, prepare, skip_first_batches

    with distributed(seed=5):
        data = _Counting(40)
        loader = prepare(DataLoader(data, batch_size=2, shuffle=True))
        full = [b.tolist() for b in loader]
        it = iter(loader)
        for _ in range(3):
            next(it)
        saved = loader.state_dict()
        del it
        data.calls = 0
        fresh = prepare(DataLoader(data, batch_size=2, shuffle=True))
        fresh.load_state_dict(saved)
        resumed = [b.tolist() for b in fresh]
        calls_after_resume = data.calls
        skipped = [b.tolist() for b in skip_first_batches(fresh, 8)]
        return {"full_epoch1": full, "saved": saved, "resumed": resumed, "calls": calls_after_resume,
                "skipped": skipped, "len": len(loader)}  # fmt: skip


def test_resume_position_and_skip_without_reloading():
    for out in run_ranks(_resume_worker, 2, timeout=120):
        assert out["saved"]["epoch"] == 1 and out["saved"]["batches_yielded"] == 3
        assert len(out["resumed"]) == out["len"] - 3
        assert out["calls"] == 2 * len(out["resumed"]), "skipped batches are not loaded"
        assert out["resumed"] != out["full_epoch1"][3:], "epoch 1 is reshuffled, unlike epoch 0"
        assert len(out["skipped"]) == out["len"] - 8


def _batch_sampler_worker() -> list:
    from distrib import distributed, gather_for_metrics, prepare

    batches = [[0, 1, 2], [3, 4], [5, 6, 7], [8], [9, 10]]
    with distributed():
        loader = prepare(DataLoader(TensorDataset(torch.arange(11)), batch_sampler=batches))
        return [v for (x,) in loader for v in gather_for_metrics(x).tolist()]


def test_custom_batch_sampler_is_sharded_by_batches():
    for seen in run_ranks(_batch_sampler_worker, 2, timeout=60):
        assert seen == list(range(11))
