"""How each epoch's order is drawn (user generators respected, user objects untouched), how a resume on
another number of processes keeps the global batch, and sample_generator; no processes."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler, WeightedRandomSampler

from distrib import distributed, sample_generator
from distrib._data.order import EpochOrder, mix
from distrib._data.resume import Geometry, Script, plan_resume
from distrib.errors import CheckpointMismatchError, DataError


def _epochs(order: EpochOrder, count: int) -> list[list[int]]:
    out = []
    for epoch in range(count):
        order.begin(epoch)
        out.append(order.draw())
        order.finish()
    return out


def test_a_user_generator_is_drawn_from_exactly_as_torch_draws_on_one_process():
    data = range(50)
    g_torch, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    plain = RandomSampler(data, generator=g_torch)
    user = RandomSampler(data, generator=g_ours)
    order = EpochOrder(user, None, seed=123)  # the seed does not reseed a generator the user gave
    expected = [list(plain) for _ in range(3)]
    assert _epochs(order, 3) == expected
    assert user.generator is g_ours, "the user's generator is never replaced"
    assert torch.equal(g_ours.get_state(), g_torch.get_state()), "and ends in the state torch leaves it in"


def test_without_a_generator_the_order_comes_from_seed_and_epoch_and_the_user_sampler_is_untouched():
    user = RandomSampler(range(30))
    a = _epochs(EpochOrder(user, None, seed=5), 2)
    b = _epochs(EpochOrder(user, None, seed=5), 2)
    assert a == b and a[0] != a[1], "the same per (seed, epoch), new each epoch"
    assert _epochs(EpochOrder(user, None, seed=6), 1)[0] != a[0]
    assert user.generator is None, "distrib shuffles a copy; the user's sampler keeps generator=None"
    state = torch.get_rng_state()
    _epochs(EpochOrder(user, None, seed=5), 1)
    assert torch.equal(state, torch.get_rng_state()), "drawing an epoch leaves the global generator alone"


class _EpochAware(Sampler[int]):
    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def test_other_samplers_are_iterated_through_a_copy():
    user = _EpochAware(10)
    order = EpochOrder(user, None, seed=0)
    epochs = _epochs(order, 3)
    assert user.epoch == 0, "set_epoch goes to distrib's copy, not to the user's sampler"
    assert epochs[2] == torch.randperm(10, generator=torch.Generator().manual_seed(2)).tolist()
    assert not order.controlled, "the ranks compare such orders every epoch"
    weighted = WeightedRandomSampler([1.0] * 10, 10)
    assert _epochs(EpochOrder(weighted, None, 3), 1) == _epochs(EpochOrder(weighted, None, 3), 1)
    assert weighted.generator is None


def test_a_batch_sampler_shuffles_its_inner_sampler_by_the_same_rules():
    user = BatchSampler(RandomSampler(range(10)), 3, drop_last=False)
    order = EpochOrder(user, None, seed=1)
    first = _epochs(order, 1)[0]
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first == _epochs(EpochOrder(user, None, seed=1), 1)[0]
    assert user.sampler.generator is None and order.controlled


def test_generator_states_restore_the_epochs_order():
    g = torch.Generator().manual_seed(3)
    order = EpochOrder(RandomSampler(range(20), generator=g), g, seed=0)
    _epochs(order, 2)
    order.begin(2)
    saved = [s.clone() for s in order.epoch_states]
    third = order.draw()
    from distrib._data.order import encode_state

    order.restore([encode_state(s) for s in saved])
    order.begin(2)
    assert order.draw() == third
    with pytest.raises(ValueError, match="2 dataloader generator states"):
        order.restore(["", ""])


def test_sample_generator_is_keyed_by_seed_index_and_epoch():
    def draw(g: torch.Generator) -> float:
        return float(torch.rand((), generator=g))

    assert draw(sample_generator(5, seed=1)) == draw(sample_generator(5, seed=1))
    values = {draw(sample_generator(i, seed=1)) for i in range(100)}
    assert len(values) == 100, "every sample gets its own stream"
    assert draw(sample_generator(5, seed=2)) != draw(sample_generator(5, seed=1))
    assert draw(sample_generator(5, seed=1, epoch=0)) != draw(sample_generator(5, seed=1, epoch=1))
    with distributed(seed=9):
        assert draw(sample_generator(5)) == draw(sample_generator(5, seed=9))
    with distributed(), pytest.raises(DataError, match="seed setting"):
        sample_generator(0)
    assert len({mix(s, e) for s in range(20) for e in range(20)}) == 400


# -- keeping the global batch on another number of processes ----------------------------------------------

SCRIPT = Script(6, 1, False)


def _plan(
    saved: Geometry,
    world: int,
    *,
    script: Script = SCRIPT,
    per_rank: int = 6,
    trains: bool = True,
    fixed=False,
):
    now = Geometry(per_rank, world, script.accumulation)
    return plan_resume(saved, script, now, script, batch_fixed=fixed, trains=trains, name="dataloader #0")


def test_the_per_rank_batch_changes_first():
    saved = Geometry(6, 2, 1)  # 12 samples per step
    assert _plan(saved, 2) == _plan(saved, 2).__class__(6, None, None), "same world size: nothing to do"
    for world, per_rank in ((1, 12), (3, 4), (4, 3), (12, 1)):
        plan = _plan(saved, world)
        assert (plan.batch_size, plan.accumulation) == (per_rank, None)
        assert plan.note is not None and f"each rank's batch is now {per_rank}" in plan.note
    assert "gradient_accumulation_steps=2" in (_plan(saved, 1).note or ""), "bigger batch: the memory hint"


def test_the_accumulation_steps_change_when_the_batch_cannot():
    saved = Geometry(3, 2, 2)  # 12 per step
    plan = _plan(saved, 4, script=Script(3, 2, False), per_rank=3)
    assert (plan.batch_size, plan.accumulation) == (3, 1)
    assert "gradient_accumulation_steps is now 1" in (plan.note or "")
    batches = _plan(Geometry(1, 2, 2), 4, script=Script(None, 2, False), per_rank=1, fixed=True)
    assert (batches.batch_size, batches.accumulation) == (1, 1), "a batch sampler's batches cannot be split"


def test_an_error_names_the_choices_when_nothing_keeps_it():
    with pytest.raises(CheckpointMismatchError, match=r"\(1, 2, 4, 8\).*change batch_size"):
        _plan(Geometry(4, 2, 1), 3, script=Script(4, 1, False), per_rank=4)
    plan = _plan(Geometry(4, 2, 1), 3, script=Script(4, 1, False), per_rank=4, trains=False)
    assert (plan.batch_size, plan.accumulation) == (4, None), "an evaluation loader keeps the script's batch"
    assert "goes from 8 to 12 per step" in (plan.note or "")


def test_a_changed_script_wins_with_a_warning():
    changed = Script(8, 1, False)
    now = Geometry(8, 3, 1)
    plan = plan_resume(Geometry(6, 2, 1), SCRIPT, now, changed, batch_fixed=False, trains=True, name="d")
    assert plan.batch_size == 8 and plan.accumulation is None
    assert "from 12 to 24 samples per optimizer step" in (plan.note or "")


def test_split_batches_keeps_the_global_batch_by_itself():
    script = Script(12, 1, True)
    now = Geometry(4, 3, 1)  # prepare already split 12 over 3
    assert (
        plan_resume(Geometry(6, 2, 1), script, now, script, batch_fixed=False, trains=True, name="d").note
        is None
    )


def test_python_random_is_not_used_for_orders():
    state = random.getstate()
    _epochs(EpochOrder(RandomSampler(range(10)), None, 0), 2)
    _epochs(EpochOrder(SequentialSampler(range(10)), None, 0), 1)
    assert random.getstate() == state
