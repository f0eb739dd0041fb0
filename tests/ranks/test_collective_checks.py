"""Every collective checks what the ranks pass (op, call site, structure, keys, shapes, dtypes, arguments)
and raises the same error on every rank instead of hanging or returning wrong data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from distrib.testing import run_ranks

# -- mismatches in every collective ----------------------------------------------------------------------


def _mismatch_cases(rank: int) -> dict:
    """One collective per case, called with inputs that differ between ranks (rank 0 vs the others)."""
    import distrib

    first = rank == 0
    return {
        "gather_shape": lambda: distrib.gather(torch.zeros(2, 3 if first else 4)),
        "gather_dtype": lambda: distrib.gather(torch.zeros(2, dtype=torch.float32 if first else torch.int64)),
        "gather_keys": lambda: distrib.gather({"a": torch.ones(1), ("b" if first else "c"): torch.ones(1)}),
        "gather_count": lambda: distrib.gather((torch.ones(1),) if first else (torch.ones(1), torch.ones(1))),
        "gather_for_metrics_shape": lambda: distrib.gather_for_metrics(torch.zeros(2, 1 if first else 2)),
        "reduce_shape": lambda: distrib.reduce(torch.ones(3 if first else 4)),
        "reduce_dtype": lambda: distrib.reduce(
            torch.ones(3, dtype=torch.float32 if first else torch.float64)
        ),
        "reduce_keys": lambda: distrib.reduce({("x" if first else "y"): torch.ones(1)}),
        "reduce_op": lambda: distrib.reduce(torch.ones(1), "sum" if first else "max"),
        "broadcast_shape": lambda: distrib.broadcast(torch.zeros(3 if first else 5)),
        "broadcast_dtype": lambda: distrib.broadcast(
            torch.zeros(3, dtype=torch.int32 if first else torch.int64)
        ),
        "broadcast_keys": lambda: distrib.broadcast({("p" if first else "q"): torch.zeros(1)}),
        "broadcast_source": lambda: distrib.broadcast(torch.zeros(1), from_process=0 if first else 1),
        "pad_ndim": lambda: distrib.pad_across_processes(
            torch.ones(2, 3) if first else torch.ones(2, 3, 1), dim=1
        ),
        "pad_dtype": lambda: distrib.pad_across_processes(
            torch.ones(2, dtype=torch.int64 if first else torch.float32)
        ),
        "pad_keys": lambda: distrib.pad_across_processes({("k" if first else "j"): torch.ones(2)}),
        "objects_length": lambda: distrib.broadcast_object_list([1] if first else [None, None]),
        "object_vs_tensor": lambda: distrib.gather_object([rank]) if first else distrib.gather(torch.ones(1)),
    }


def _every_mismatch_worker() -> dict:
    from distrib import distributed, gather
    from distrib.errors import CollectiveError

    out = {}
    with distributed() as ctx:
        for name, call in _mismatch_cases(ctx.rank).items():
            try:
                call()
                out[name] = "no error"
            except CollectiveError as exc:
                out[name] = (type(exc).__name__, str(exc))
        # after all those errors the ranks still agree: a correct collective works
        out["after"] = gather(torch.tensor([ctx.rank])).tolist()
    return out


@pytest.fixture(scope="module")
def every_mismatch():
    return run_ranks(_every_mismatch_worker, 2, timeout=240)


EXPECTED_WORDS = {
    "gather_shape": ["different shapes", "float32[2, 3]", "float32[2, 4]", "pad_across_processes"],
    "gather_dtype": ["different dtypes", "float32[2]", "int64[2]"],
    "gather_keys": ["different structures", "['a', 'b']", "['a', 'c']"],
    "gather_count": ["different structures", "tuple of 1", "tuple of 2"],
    "gather_for_metrics_shape": ["gather_for_metrics()", "float32[2, 1]", "float32[2, 2]"],
    "reduce_shape": ["reduce()", "float32[3]", "float32[4]", "pad_across_processes"],
    "reduce_dtype": ["reduce()", "float32[3]", "float64[3]"],
    "reduce_keys": ["different structures", "['x']", "['y']"],
    "reduce_op": ["different arguments", "reduction='sum'", "reduction='max'"],
    "broadcast_shape": ["broadcast()", "float32[3]", "float32[5]"],
    "broadcast_dtype": ["broadcast()", "int32[3]", "int64[3]"],
    "broadcast_keys": ["different structures", "['p']", "['q']"],
    "broadcast_source": ["different arguments", "from_process=0", "from_process=1"],
    "pad_ndim": ["numbers of dimensions", "float32[2, 3]", "float32[2, 3, 1]"],
    "pad_dtype": ["different dtypes", "int64[2]", "float32[2]"],
    "pad_keys": ["different structures", "['k']", "['j']"],
    "objects_length": ["different arguments", "len(objects)=1", "len(objects)=2"],
    "object_vs_tensor": ["different collectives", "gather_object", "gather"],
}


@pytest.mark.parametrize("case", sorted(EXPECTED_WORDS))
def test_every_collective_names_what_differs_on_every_rank(every_mismatch, case):
    messages = [result[case] for result in every_mismatch]
    for kind, message in messages:
        assert kind == "CollectiveMismatchError", message
        for word in EXPECTED_WORDS[case]:
            assert word in message, f"{word!r} not in:\n{message}"
        assert re.search(r"(?m)^\s+rank\s+collective\s+call site", message), "a table with a header row"
        assert re.search(r"(?m)^\s+0\s+\S", message) and re.search(r"(?m)^\s+1\s+\S", message), (
            "a row per rank"
        )
    tables = [message.split("\n", 1)[1] for _, message in messages]
    assert tables[0] == tables[1], "every rank raises with the same table (the first line names its own call)"


def test_the_ranks_still_agree_after_the_errors(every_mismatch):
    assert [r["after"] for r in every_mismatch] == [[0, 1], [0, 1]]


# -- a rank skipping a collective ------------------------------------------------------------------------


def _skip_worker(world_calls: int) -> str:
    from distrib import distributed, gather, wait_for_everyone
    from distrib.errors import CollectiveMismatchError

    with distributed() as ctx:
        for _ in range(world_calls):  # a few agreed calls first, so the fast path is in use
            gather(torch.ones(2))
        try:
            if ctx.rank == 0:
                gather(torch.ones(2))  # only rank 0 gathers here
            wait_for_everyone()
        except CollectiveMismatchError as exc:
            return str(exc)
        return "no error"


@pytest.mark.parametrize("calls_before", [0, 3])
def test_a_rank_skipping_a_gather_is_named_on_every_rank(calls_before):
    messages = run_ranks(_skip_worker, 2, calls_before, timeout=240)
    for message in messages:
        assert "the ranks called different collectives" in message
        assert "gather" in message and "wait_for_everyone" in message
        assert "test_collective_checks.py:" in message, "the user's call sites are in the table"
        assert "if rank == 0:" in message


def _three_rank_worker() -> str:
    from distrib import distributed, reduce, wait_for_everyone
    from distrib.errors import CollectiveMismatchError

    with distributed() as ctx:
        try:
            if ctx.rank != 2:
                reduce(torch.ones(1))
            wait_for_everyone()
        except CollectiveMismatchError as exc:
            return str(exc)
        return "no error"


def test_with_three_ranks_the_odd_one_out_is_named():
    messages = run_ranks(_three_rank_worker, 3, timeout=240)
    for message in messages:
        assert re.search(r"rank 2 did not call reduce\(\) at \S+test_collective_checks.py:\d+", message), (
            message
        )


# -- a rank leaving early, a rank raising -------------------------------------------------------------


def _early_exit_worker() -> tuple[str, str]:
    from distrib import distributed, gather
    from distrib.errors import CollectiveMismatchError

    try:
        with distributed() as ctx:
            if ctx.rank == 1:
                return ("left", "")  # rank 1 is done early; rank 0 still gathers
            gather(torch.ones(2))
    except CollectiveMismatchError as exc:
        return (type(exc).__name__, str(exc))
    return ("no error", "")


def test_a_rank_leaving_the_scope_early_is_named_on_every_rank():
    (kind0, message0), (kind1, message1) = run_ranks(_early_exit_worker, 2, timeout=240)
    assert kind0 == kind1 == "CollectiveMismatchError"
    for message in (message0, message1):
        assert "rank 1 left the distributed() scope" in message
        assert "gather()" in message


def _raising_worker() -> str:
    from distrib import distributed, gather
    from distrib.errors import CollectiveMismatchError

    try:
        with distributed() as ctx:
            gather(torch.ones(2))
            if ctx.rank == 1:
                raise ValueError("rank one broke")
            gather(torch.ones(2))
    except CollectiveMismatchError as exc:
        return str(exc)
    except ValueError as exc:
        return f"raised {exc}"
    return "no error"


def test_the_ranks_left_waiting_say_why_their_peer_left():
    waiting, raised = run_ranks(_raising_worker, 2, timeout=240)
    assert raised == "raised rank one broke"
    assert "cannot complete on rank 0: rank 1 left the run." in waiting
    assert re.search(
        r"(?m)^\s+1\s+left the run: it raised ValueError: rank one broke at \S+test_collective_checks.py:\d+",
        waiting,
    )
    assert re.search(r"after collective #1: gather\(\) at \S+test_collective_checks.py:\d+", waiting), (
        "its last collective"
    )


# -- results stay exact on the fast path ----------------------------------------------------------------


def _exact_worker() -> dict:
    from distrib import distributed, gather, gather_for_metrics, reduce

    with distributed() as ctx:
        r = ctx.rank
        out: dict = {"alternating": [], "mixed": [], "bf16": [], "nan": []}
        for step in range(6):  # two call sites, shapes changing every other step: predictions miss and hit
            a = gather(torch.full((2, 1 + step % 2), float(r)))
            b = gather_for_metrics((torch.arange(3) + r, torch.tensor([r % 2 == 0])))
            out["alternating"].append((a.tolist(), b[0].tolist(), b[1].tolist()))
        for _ in range(3):
            mixed = gather(
                {
                    "f": torch.tensor([0.5 + r]),
                    "i": torch.tensor([r], dtype=torch.int32),
                    "b": torch.tensor([True]),
                }
            )
            out["mixed"].append({k: v.tolist() for k, v in mixed.items()})
            out["bf16"].append(gather(torch.tensor([r + 0.25], dtype=torch.bfloat16)).float().tolist())
            nan = gather(torch.tensor([float("nan"), float(r)]))
            out["nan"].append([str(v) for v in nan.tolist()])
        out["reductions"] = {
            op: reduce(torch.tensor([r + 1.0, 10.0 - r]), op).tolist()
            for op in ("sum", "mean", "max", "min", "product")
        }
        out["int_mean"] = reduce(torch.tensor([r + 1]), "mean").tolist()
        for _ in range(2):  # dtypes the backends do not move travel as bytes; empty and strided tensors
            out["edges"] = {
                "complex": gather(torch.tensor([1 + 1j * r], dtype=torch.complex64)).tolist(),
                "int16": gather(torch.tensor([r], dtype=torch.int16)).tolist(),
                "empty": tuple(gather(torch.zeros(0, 4)).shape),
                "ragged_empty": tuple(gather(torch.ones(2 * r, 3)).shape),
                "strided": gather(torch.arange(6.0).view(2, 3).T + r).tolist(),
                "bool_sum": reduce(torch.tensor([r == 0, False]), "sum").tolist(),
            }
        out["big_sum"] = (
            reduce(torch.full((300_000,), float(r + 1))).sum().item()
        )  # too big for the fast path
        return out


def test_results_are_exact_on_every_path():
    world = 3
    results = run_ranks(_exact_worker, world, timeout=240)
    ranks = range(world)
    for out in results:
        for step, (a, b0, b1) in enumerate(out["alternating"]):
            width = 1 + step % 2
            assert a == [[float(r)] * width for r in ranks for _ in range(2)]
            assert b0 == [v + r for r in ranks for v in range(3)]
            assert b1 == [r % 2 == 0 for r in ranks]
        assert all(
            m == {"f": [0.5 + r for r in ranks], "i": list(ranks), "b": [True] * world} for m in out["mixed"]
        )
        assert all(v == [r + 0.25 for r in ranks] for v in out["bf16"])
        assert all(v == [s for r in ranks for s in ("nan", str(float(r)))] for v in out["nan"])
        assert out["reductions"]["sum"] == [6.0, 27.0]
        assert out["reductions"]["mean"] == [2.0, 9.0]
        assert out["reductions"]["max"] == [3.0, 10.0]
        assert out["reductions"]["min"] == [1.0, 8.0]
        assert out["reductions"]["product"] == [6.0, 720.0]
        assert out["int_mean"] == [2.0]
        edges = out["edges"]
        assert edges["complex"] == [complex(1, r) for r in ranks] and edges["int16"] == list(ranks)
        assert edges["empty"] == (0, 4) and edges["ragged_empty"] == (2 * sum(ranks), 3)
        assert edges["strided"] == [[c + r, c + 3.0 + r] for r in ranks for c in (0.0, 1.0, 2.0)]
        assert edges["bool_sum"] == [True, False]
        assert out["big_sum"] == pytest.approx(6.0 * 300_000)
    assert results[0] == results[1] == results[2], "every rank gets the same bits"


# -- arguments and process control ----------------------------------------------------------------


def _process_worker() -> dict:
    import distrib
    from distrib import distributed
    from distrib.errors import CollectiveError, TrainingError

    calls = []

    @distrib.on_process(1)
    def only_one():
        calls.append("one")
        return "one"

    @distrib.on_last_process
    def only_last():
        calls.append("last")
        return "last"

    @distrib.on_process(7)
    def nowhere():
        return "never"

    out: dict = {}
    with distributed() as ctx:
        out["one"], out["last"] = only_one(), only_last()
        try:
            nowhere()
        except TrainingError as exc:
            out["nowhere"] = str(exc)
        for src in (ctx.world_size, -1):
            try:
                distrib.broadcast(torch.zeros(1), from_process=src)
            except CollectiveError as exc:
                out[f"src {src}"] = str(exc)
        big = torch.full((200_000,), float(ctx.rank))  # broadcast by the native path
        distrib.broadcast(big, from_process=2)
        out["big"] = big[:3].tolist()
        out["objects"] = distrib.broadcast_object_list([{"rank": ctx.rank}], from_process=1)
        try:
            distrib.gather_object((lambda: 1) if ctx.rank == 0 else ctx.rank)  # rank 0's cannot be pickled
        except CollectiveError as exc:
            out["pickle"] = (type(exc).__name__, str(exc))
        out["first"] = distrib.check_trigger()
        if ctx.rank == 2:
            distrib.set_trigger()
        out["set"] = distrib.check_trigger()
        out["reset"] = distrib.check_trigger()
        out["calls"] = calls
    return out


def test_process_control_and_arguments():
    results = run_ranks(_process_worker, 3, timeout=240)
    assert [r["one"] for r in results] == [None, "one", None]
    assert [r["last"] for r in results] == [None, None, "last"]
    assert [r["calls"] for r in results] == [[], ["one"], ["last"]]
    for r in results:
        assert "@on_process(7)" in r["nowhere"] and "3 processes" in r["nowhere"]
        assert "from_process=3" in r["src 3"] and "ranks 0 to 2" in r["src 3"]
        assert "from_process=-1" in r["src -1"]
        assert r["big"] == [2.0, 2.0, 2.0]
        assert r["objects"] == [{"rank": 1}]
        assert (r["first"], r["set"], r["reset"]) == (False, True, False)
        kind, message = r["pickle"]
        assert (
            kind == "CollectiveError"
            and "a rank could not take part" in message
            and "rank 0: cannot pickle" in message
        )


# -- debug mode: the user's own torch.distributed calls ------------------------------------------------------


def _debug_worker() -> dict:
    import torch.distributed as dist

    from distrib import distributed
    from distrib.errors import CollectiveMismatchError

    out: dict = {}
    original = dist.all_reduce
    with distributed(debug_collectives=True) as ctx:
        out["wrapped"] = dist.all_reduce is not original
        t = torch.ones(2) * (ctx.rank + 1)
        dist.all_reduce(t)
        out["sum"] = t.tolist()
        try:
            if ctx.rank == 0:
                dist.all_reduce(torch.ones(3))
            else:
                dist.broadcast(torch.ones(3), src=0)
        except CollectiveMismatchError as exc:
            out["op"] = str(exc)
        try:
            dist.all_reduce(torch.ones(2 + ctx.rank))
        except CollectiveMismatchError as exc:
            out["shape"] = str(exc)
        ledger = ctx.state.extensions["ledger"]
        out["ledger"] = [e["op"] for e in ledger.last_entries()]
    out["unwrapped"] = dist.all_reduce is original
    return out


def test_debug_mode_checks_the_users_torch_distributed_calls():
    results = run_ranks(_debug_worker, 2, timeout=240)
    for r in results:
        assert r["sum"] == [3.0, 3.0]
        assert "torch.distributed.all_reduce" in r["op"] and "torch.distributed.broadcast" in r["op"]
        assert "test_collective_checks.py:" in r["op"]
        assert "float32[2]" in r["shape"] and "float32[3]" in r["shape"]
        assert r["ledger"][0] == "torch.distributed.all_reduce"
        assert r["wrapped"] and r["unwrapped"], "debug mode wraps torch.distributed only inside the scope"


def _killed_worker(path: str) -> None:
    import os
    import signal

    from distrib import distributed, gather
    from distrib.errors import CollectiveMismatchError

    with distributed() as ctx:
        gather(torch.ones(2))
        if ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # no word to the others: as an out-of-memory kill
        try:
            gather(torch.ones(2))
        except CollectiveMismatchError as exc:
            Path(path).write_text(str(exc))
            raise


def test_a_killed_peer_is_reported_as_gone(tmp_path):
    from distrib.testing import RanksFailed

    path = tmp_path / "rank0.txt"
    with pytest.raises(RanksFailed, match=r"rank 1: no result \(exit code -9"):
        run_ranks(_killed_worker, 2, str(path), timeout=240)
    message = path.read_text()
    assert "gather() at" in message and "cannot complete on rank 0" in message
    assert "another rank closed its connection: it crashed, was killed, or left without a word" in message
