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
