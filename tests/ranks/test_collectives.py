"""Collectives and process control on real gloo processes (2 and 4 ranks)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from distrib.testing import RanksFailed, run_ranks


def _collectives_worker() -> dict:
    from distrib import (
        broadcast,
        broadcast_object_list,
        distributed,
        gather,
        gather_object,
        pad_across_processes,
        reduce,
        split_between_processes,
        wait_for_everyone,
    )

    with distributed() as ctx:
        r, w = ctx.rank, ctx.world_size
        out: dict = {}
        out["gather_scalar"] = gather(torch.tensor(float(r))).tolist()
        nested = gather({"a": torch.full((2, 3), r), "b": [torch.tensor([r, r + 10])]})
        out["gather_nested"] = (nested["a"].shape, nested["a"][:, 0].tolist(), nested["b"][0].tolist())
        out["gather_ragged"] = gather(torch.arange(r + 1)).tolist()
        out["gather_object"] = gather_object([f"r{r}"] * (r + 1))
        out["gather_object_dict"] = gather_object({"rank": r})
        padded = pad_across_processes(torch.ones(2, r + 1), dim=1, pad_index=-1)
        out["pad"] = padded.tolist()
        out["pad_first"] = pad_across_processes(torch.ones(r + 1), pad_first=True).tolist()
        out["reduce_sum"] = reduce(torch.tensor([float(r)])).item()
        out["reduce_mean"] = reduce({"x": torch.tensor([float(r)])}, "mean")["x"].item()
        t = torch.tensor([r * 100])
        broadcast(t, from_process=w - 1)
        out["broadcast"] = t.item()
        out["broadcast_object"] = broadcast_object_list([{"from": r}] if r == 0 else [None])[0]
        with split_between_processes(list(range(7))) as part:
            out["split"] = part
        with split_between_processes(torch.arange(7), apply_padding=True) as tpart:
            out["split_pad"] = tpart.tolist()
        with split_between_processes({"a": [1, 2, 3, 4], "b": ("w", "x", "y", "z")}) as dpart:
            out["split_dict"] = dpart
        wait_for_everyone()
        return out


@pytest.mark.parametrize("world", [2, 4])
def test_collectives(world):
    results = run_ranks(_collectives_worker, world, timeout=120)
    ranks = range(world)
    for r, out in enumerate(results):
        assert out["gather_scalar"] == [float(i) for i in ranks]
        shape, col, b = out["gather_nested"]
        assert tuple(shape) == (2 * world, 3)
        assert col == [i for i in ranks for _ in range(2)]
        assert b == [v for i in ranks for v in (i, i + 10)]
        assert out["gather_ragged"] == [v for i in ranks for v in range(i + 1)]
        assert out["gather_object"] == [f"r{i}" for i in ranks for _ in range(i + 1)]
        assert out["gather_object_dict"] == [{"rank": i} for i in ranks]
        assert len(out["pad"][0]) == world and out["pad"][0][r + 1 :] == [-1] * (world - r - 1)
        assert out["pad_first"][: world - r - 1] == [0] * (world - r - 1)
        assert out["reduce_sum"] == sum(ranks)
        assert out["reduce_mean"] == pytest.approx(sum(ranks) / world)
        assert out["broadcast"] == (world - 1) * 100
        assert out["broadcast_object"] == {"from": 0}
        assert len(out["split_pad"]) == -(-7 // world)
        assert set(out["split_dict"]) == {"a", "b"}
    assert [v for out in results for v in out["split"]] == list(range(7))


def _mismatch_worker() -> str:
    from distrib import distributed, gather
    from distrib.errors import CollectiveError

    with distributed() as ctx:
        try:
            gather(torch.zeros(2, 3 + ctx.rank))
        except CollectiveError as exc:
            return str(exc)
        return "no error"


def test_gather_with_different_shapes_explains_instead_of_hanging():
    messages = run_ranks(_mismatch_worker, 2, timeout=60)
    for message in messages:
        assert "different shapes across ranks" in message and "pad_across_processes" in message


def _process_control_worker(path: str) -> dict:
    import distrib
    from distrib import distributed, main_process_first, on_local_main_process, on_main_process

    @on_main_process
    def only_main():
        return "main"

    @on_local_main_process
    def only_local_main():
        return "local"

    with distributed() as ctx:
        with main_process_first():
            with open(path, "a") as f:
                f.write(f"{ctx.rank} {time.time()}\n")
            if ctx.is_main_process:
                time.sleep(0.5)  # others must still wait for the main process to leave the block
        distrib.print(f"printed by rank {ctx.rank}")
        return {
            "main": only_main(),
            "local": only_local_main(),
            "is_main": distrib.is_main_process(),
            "is_local_main": distrib.is_local_main_process(),
            "seed": distrib.set_seed(10, device_specific=True),
        }


def test_process_control(tmp_path, capfd):
    path = str(tmp_path / "order.txt")
    results = run_ranks(_process_control_worker, 2, path, timeout=60)
    order = [line.split()[0] for line in Path(path).read_text().splitlines()]
    assert order[0] == "0" and sorted(order) == ["0", "1"]
    assert [r["main"] for r in results] == ["main", None]
    assert [r["local"] for r in results] == ["local", None]
    assert [r["is_main"] for r in results] == [True, False]
    assert [r["seed"] for r in results] == [10, 11]
    printed = capfd.readouterr().out
    assert "printed by rank 0" in printed and "printed by rank 1" not in printed


def _failing_worker() -> None:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank one broke")


def test_run_ranks_reports_the_failing_rank():
    with pytest.raises(RanksFailed, match=r"(?s)rank 1: raised.*ValueError: rank one broke"):
        run_ranks(_failing_worker, 2, timeout=60)


def _hanging_worker() -> None:
    from distrib import distributed, wait_for_everyone

    with distributed(timeout=600):
        if int(os.environ["RANK"]) == 0:
            wait_for_everyone()  # rank 1 never joins: rank 0 would wait for the whole timeout
        else:
            time.sleep(600)


def test_a_hang_fails_fast_with_the_stacks_of_hung_ranks(capfd):
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"(?s)rank 0: no result .*stopped after 20 s.*rank 1: no result"):
        run_ranks(_hanging_worker, 2, timeout=20)
    assert time.monotonic() - start < 45
    assert "_hanging_worker" in capfd.readouterr().err, "the hung rank printed where it was stuck"


def _reduce_mismatch_worker() -> str:
    from distrib import distributed, reduce
    from distrib.errors import CollectiveError

    with distributed() as ctx:
        try:
            reduce(torch.ones(ctx.rank + 1))
        except CollectiveError as exc:
            return str(exc)
        return "no error"


def test_reduce_with_different_shapes_explains_instead_of_hanging():
    for message in run_ranks(_reduce_mismatch_worker, 2, timeout=60):
        assert "reduce()" in message and "pad_across_processes" in message
