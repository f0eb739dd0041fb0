"""How a stream of samples is cut into per-rank batches (GlobalBatchCutter), without processes."""

from __future__ import annotations

import pytest

from distrib._data.sharding import GlobalBatchCutter


@pytest.mark.parametrize("n", [1, 7, 12, 13, 16])
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("even", "drop_last"), [(True, False), (False, False), (True, True)])
def test_cutting_rules(n, world, batch, even, drop_last):
    per_rank = []
    for rank in range(world):
        cutter = GlobalBatchCutter(batch, rank, world, drop_last, even)
        batches = list(cutter.cut(range(n)))
        assert len(batches) == cutter.num_batches(n), "len() must match what iteration yields"
        per_rank.append(batches)
    flat = [i for step in zip(*per_rank) for b in step for i in b] if even and world > 1 else None
    real = n - n % (batch * world) if drop_last else n
    if even and world > 1:
        assert len({len(b) for b in per_rank}) == 1, "even_batches: every rank takes the same number of steps"
        assert flat is not None and flat[:real] == list(range(real)), "rank order gives dataset order"
    else:
        seen = sorted(i for batches in per_rank for b in batches for i in b)
        assert seen == list(range(real)), "without padding every sample is seen once"


@pytest.mark.parametrize("n", [7, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("even", "drop_last"), [(True, False), (False, False), (False, True)])
def test_cutting_from_any_start_deals_the_rest_once(n, world, batch, even, drop_last):
    """A resume deals the rest of the epoch's order from unit `start`; padding still wraps to the epoch's
    first units, so it is the padding an uninterrupted run would have used."""
    order = [100 + i for i in range(n)]  # an order that is not 0..n-1
    size = batch * world
    for start in range(0, n + 1, size):  # resumes happen at global-batch boundaries
        per_rank = []
        for rank in range(world):
            cutter = GlobalBatchCutter(batch, rank, world, drop_last, even)
            batches = list(cutter.cut(order, start))
            assert len(batches) == cutter.num_batches(n, start), "len() must match what iteration yields"
            assert list(cutter.cut(iter(order), start)) == batches, "a stream is cut like a list"
            per_rank.append(batches)
        uninterrupted = [
            list(GlobalBatchCutter(batch, r, world, drop_last, even).cut(order)) for r in range(world)
        ]
        skipped = start // size
        assert per_rank == [b[skipped:] for b in uninterrupted], f"start {start}: the rest of the same cut"
        rest = n - start
        real = rest - rest % size if drop_last else rest
        dealt = sorted(i for batches in per_rank for b in batches for i in b)
        if not (even and world > 1):
            assert dealt == order[start : start + real]


def test_position_counts_padding_and_global_batch_is_padded_like_the_cut():
    cutter = GlobalBatchCutter(2, 0, 3, False, True)  # global batch 6
    order = list(range(10))
    assert cutter.position(0, 1, 10) == (6, 0)
    assert cutter.position(0, 2, 10) == (10, 2), "the final batch took 2 padding samples"
    assert cutter.global_batch(order, 6) == [6, 7, 8, 9, 0, 1], "padded from the epoch's first samples"
    assert cutter.global_batch(order, 10) == [], "nothing after the end"
    uneven = GlobalBatchCutter(2, 0, 3, False, False)
    assert uneven.position(0, 2, 10) == (10, 0) and uneven.global_batch(order, 6) == [6, 7, 8, 9]
