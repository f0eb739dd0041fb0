"""A prepared loader on one process: resume at every stop point (the end of an epoch included), the user's
generator and objects, progress bars, conflicting calls, and the resume fingerprint catching broken
restores. Multi-process versions are in tests/ranks/test_data_resume.py."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from distrib import distributed, prepare, progress_bar, skip_first_batches
from distrib._data.loader import PreparedDataLoader
from distrib.checkpointing import load_state, register_for_checkpointing, save_state
from distrib.errors import DataError, PrepareError, ResumeMismatchError

N, BATCH, EPOCHS = 10, 3, 3  # 4 batches per epoch, the last one short


class Counter:
    """The user's own epoch and step counters, saved with the run."""

    def __init__(self) -> None:
        self.epoch = 0
        self.steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.steps = state["epoch"], state["steps"]


def _loop(
    workdir: Path, stop_at: int | None = None, resume: bool = False, save_after_epoch: int | None = None
):
    """Train-like loop over EPOCHS driven by the user's own counter; returns the batches it saw."""
    with distributed(project_dir=str(workdir), seed=0):
        loader = prepare(DataLoader(TensorDataset(torch.arange(N)), batch_size=BATCH, shuffle=True))
        counter = Counter()
        register_for_checkpointing(counter)
        if resume:
            assert load_state() is not None
        seen = []
        while counter.epoch < EPOCHS:
            for (x,) in loader:
                assert loader.epoch == counter.epoch, "the loader's epoch and the user's counter agree"
                seen.append(x.tolist())
                counter.steps += 1
                if counter.steps == stop_at:
                    save_state()  # inside the loop, as most scripts save
                    return seen
            counter.epoch += 1
            if counter.epoch == save_after_epoch:
                save_state()  # after the epoch's loop has finished
                return seen
        return seen


def test_resume_at_every_stop_point_continues_exactly(tmp_path: Path):
    reference = _loop(tmp_path / "ref")
    assert len(reference) == EPOCHS * 4
    for stop in range(1, len(reference) + 1):  # first and last batch of every epoch, the last step too
        first = _loop(tmp_path / f"s{stop}", stop_at=stop)
        rest = _loop(tmp_path / f"s{stop}", resume=True)
        assert first + rest == reference, f"stop after batch {stop}"


def test_a_save_after_the_epoch_loop_resumes_at_the_next_epoch(tmp_path: Path):
    reference = _loop(tmp_path / "ref")
    first = _loop(tmp_path / "e", save_after_epoch=1)
    rest = _loop(tmp_path / "e", resume=True)
    assert first + rest == reference


def test_state_dict_is_a_global_position(tmp_path: Path):
    with distributed(seed=0):
        loader = prepare(DataLoader(TensorDataset(torch.arange(N)), batch_size=BATCH, shuffle=True))
        assert loader.state_dict()["samples_consumed"] == 0
        it = iter(loader)
        next(it), next(it)
        state = loader.state_dict()
        assert (state["epoch"], state["samples_consumed"], state["padding"]) == (0, 6, 0)
        assert (state["batch_size"], state["world_size"], state["num_units"]) == (3, 1, N)
        for _ in it:
            pass
        after = loader.state_dict()
        assert (after["epoch"], after["samples_consumed"]) == (1, 0), "after the loop: the next epoch"
        legacy = PreparedDataLoader.load_state_dict
        legacy(loader, {"epoch": 2, "batches_yielded": 1, "seed": 0})  # a first-release checkpoint
        assert (loader.epoch, loader.next_start_batch) == (2, 1)


def test_the_users_generator_is_used_as_torch_uses_it_and_never_replaced():
    def plain_epochs(g: torch.Generator) -> list[list[int]]:
        loader = DataLoader(TensorDataset(torch.arange(20)), batch_size=4, shuffle=True, generator=g)
        return [[v for (x,) in loader for v in x.tolist()] for _ in range(3)]

    expected = plain_epochs(torch.Generator().manual_seed(11))
    with distributed(seed=999):  # the seed setting does not reseed the user's generator
        g = torch.Generator().manual_seed(11)
        user = DataLoader(TensorDataset(torch.arange(20)), batch_size=4, shuffle=True, generator=g)
        loader = prepare(user)
        got = [[v for (x,) in loader for v in x.tolist()] for _ in range(3)]
        assert got == expected
        assert user.sampler.generator is g and loader.sampler is user.sampler and loader.generator is g
    reference = torch.Generator().manual_seed(11)
    plain_epochs(reference)
    assert torch.equal(g.get_state(), reference.get_state()), "g ends where the plain loop leaves it"


def test_progress_bar_starts_at_the_resumed_batch(tmp_path: Path):
    _loop(tmp_path, stop_at=2)
    with distributed(project_dir=str(tmp_path), seed=0):
        loader = prepare(DataLoader(TensorDataset(torch.arange(N)), batch_size=BATCH, shuffle=True))
        register_for_checkpointing(Counter())
        load_state()
        bar = progress_bar(loader, file=io.StringIO())
        assert bar.n == 2 and bar.total == 4
        for _ in bar:
            pass
        assert bar.n == 4, "the bar ends at len(loader), not at the batches left"
        bar.close()


def test_calls_that_would_contradict_the_resumed_position_raise(tmp_path: Path):
    _loop(tmp_path, stop_at=6)  # epoch 1, after 2 batches
    with distributed(project_dir=str(tmp_path), seed=0):
        loader = prepare(DataLoader(TensorDataset(torch.arange(N)), batch_size=BATCH, shuffle=True))
        register_for_checkpointing(Counter())
        load_state()
        with pytest.raises(DataError, match=r"set_epoch\(2\).*middle of epoch 1"):
            loader.set_epoch(2)
        with pytest.raises(DataError, match="Remove the skip_first_batches call"):
            skip_first_batches(loader, 3)
        loader.set_epoch(1)
        assert skip_first_batches(loader, 2) is loader, "the same position is fine"
        assert len(list(loader)) == 2


class _PrivateShuffle(Sampler[int]):
    """A sampler whose order comes from its own unseeded generator: it cannot be resumed exactly."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rng = random.Random(os.urandom(8))

    def __iter__(self):
        order = list(range(self.n))
        self.rng.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n


def _private_run(workdir: Path, resume: bool) -> list[Any]:
    with distributed(project_dir=str(workdir)):
        loader = prepare(
            DataLoader(TensorDataset(torch.arange(40)), batch_size=4, sampler=_PrivateShuffle(40))
        )
        if resume:
            load_state()
            return [x.tolist() for (x,) in loader]
        it = iter(loader)
        next(it)
        save_state()
        return []


def test_the_fingerprint_catches_a_sampler_that_does_not_resume(tmp_path: Path):
    _private_run(tmp_path, resume=False)
    with pytest.raises(ResumeMismatchError, match=r"first batch after load_state.*expected \["):
        _private_run(tmp_path, resume=True)


def test_the_fingerprint_catches_a_position_restored_wrongly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _loop(tmp_path, stop_at=4)  # the last batch of epoch 0, saved inside the loop

    original = PreparedDataLoader.load_state_dict

    def jumps_ahead(self: PreparedDataLoader, state: dict[str, Any]) -> None:  # the first release's bug
        original(self, state)
        if self.next_start_batch >= len(self):
            self._next_epoch, self._pending = self._next_epoch + 1, 0

    monkeypatch.setattr(PreparedDataLoader, "load_state_dict", jumps_ahead)
    with pytest.raises(
        ResumeMismatchError, match=r"resume at epoch 1 after 0 samples.*saved at epoch 0 after 10"
    ):
        _loop(tmp_path, resume=True)


class _ResetsLearningRate:
    """A registered object with a bug: loading it resets the optimizer's learning rate."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = 1.0


def test_the_fingerprint_catches_a_changed_learning_rate(tmp_path: Path):
    for resume in (False, True):
        with distributed(project_dir=str(tmp_path)):
            model = torch.nn.Linear(2, 1)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            model, optimizer = prepare(model, optimizer)
            register_for_checkpointing(_ResetsLearningRate(optimizer))
            if not resume:
                save_state()
                continue
            with pytest.raises(
                ResumeMismatchError, match=r"learning_rates: expected \[\[0.1\]\], found \[\[1.0\]\]"
            ):
                load_state()


def test_batch_size_none_with_a_batch_sampler_is_dealt_by_batches_and_resumes(tmp_path: Path):
    data = TensorDataset(torch.arange(11))
    sampler = BatchSampler(RandomSampler(data), 3, drop_last=False)
    with distributed(project_dir=str(tmp_path), seed=4):
        loader = prepare(DataLoader(data, sampler=sampler, batch_size=None))
        full = [x.tolist() for (x,) in loader]
        assert [len(b) for b in full] == [3, 3, 3, 2]
        assert sorted(v for b in full for v in b) == list(range(11))
        loader.set_epoch(0)
        it = iter(loader)
        next(it)
        save_state()
        del it
    with distributed(project_dir=str(tmp_path), seed=4):
        loader = prepare(DataLoader(data, sampler=sampler, batch_size=None))
        load_state()
        assert [x.tolist() for (x,) in loader] == full[1:]
    with distributed(), pytest.raises(PrepareError, match="yields single indices"):
        prepare(DataLoader(data, batch_size=None))


def test_a_distributed_sampler_is_refused_with_the_fix():
    data = TensorDataset(torch.arange(8))
    with (
        distributed(),
        pytest.raises(PrepareError, match=r"DistributedSampler over 2 replicas.*shuffle=True"),
    ):
        prepare(DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0), batch_size=2))


def _random_case(rng: random.Random) -> dict[str, Any]:
    return {
        "n": rng.randint(5, 23),
        "batch_size": rng.randint(1, 4),
        "accumulation": rng.randint(1, 3),
        "drop_last": rng.random() < 0.3,
        "source": rng.choice(["seed", "generator", "batch_sampler", "sequential"]),
        "epochs": rng.randint(1, 3),
    }


def _case_loader(case: dict[str, Any]) -> DataLoader:
    data = TensorDataset(torch.arange(case["n"]))
    size, drop = case["batch_size"], case["drop_last"]
    if case["source"] == "generator":
        return DataLoader(
            data, batch_size=size, shuffle=True, drop_last=drop, generator=torch.Generator().manual_seed(3)
        )
    if case["source"] == "batch_sampler":
        return DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), size, drop))
    return DataLoader(data, batch_size=size, shuffle=case["source"] == "seed", drop_last=drop)


def _case_run(
    workdir: Path, case: dict[str, Any], stop_at: int | None = None, resume: bool = False
) -> list[Any]:
    from distrib import accumulate, backward

    with distributed(
        project_dir=str(workdir), seed=1, gradient_accumulation_steps=case["accumulation"]
    ) as ctx:
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model, optimizer, loader = prepare(model, optimizer, _case_loader(case))
        if resume:
            load_state()
        seen, micro = [], 0
        for _ in range(loader.epoch, case["epochs"]):
            for (x,) in loader:
                with accumulate(model):
                    backward(model(x.float().view(-1, 1)).mean())
                    optimizer.step()
                    optimizer.zero_grad()
                seen.append(x.tolist())
                micro += 1
                if micro == stop_at and ctx.sync_gradients:
                    save_state()
                    return seen
        return seen


def test_no_false_alarm_over_random_stop_points(tmp_path: Path):
    """Random loaders (seeded shuffles, user generators, batch samplers, drop_last, accumulation) stopped
    at random batches: every resume continues the data exactly and the fingerprint never fires."""
    rng = random.Random(2024)
    checked = 0
    for case_number in range(12):
        case = _random_case(rng)
        reference = _case_run(tmp_path / f"c{case_number}", case)
        for stop in sorted(rng.sample(range(1, len(reference) + 1), min(3, len(reference)))):
            directory = tmp_path / f"c{case_number}s{stop}"
            first = _case_run(directory, case, stop_at=stop)
            if len(first) != stop:
                continue  # the stop fell inside an accumulation window: no save there in this loop
            assert first + _case_run(directory, case, resume=True) == reference, (case, stop)
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("persistent", [False, True])
def test_resume_with_dataloader_workers(tmp_path: Path, persistent: bool):
    """With workers, DataLoader asks the sampler for a new iterator twice while it starts; the resumed
    position must survive that (the fingerprint caught it when it did not)."""

    def make() -> Any:
        data = TensorDataset(torch.arange(20))
        return prepare(
            DataLoader(data, batch_size=2, shuffle=True, num_workers=2, persistent_workers=persistent)
        )

    with distributed(project_dir=str(tmp_path), seed=0):
        loader = make()
        epochs = [[x.tolist() for (x,) in loader] for _ in range(2)]
        loader.set_epoch(1)
        it = iter(loader)
        next(it), next(it), next(it)
        save_state()
        del it
    with distributed(project_dir=str(tmp_path), seed=0):
        loader = make()
        load_state()
        assert [x.tolist() for (x,) in loader] == epochs[1][3:]
        assert len([x for (x,) in loader]) == 10, "the next epoch is whole"


def test_the_fingerprint_skips_gpus_this_process_cannot_see(tmp_path: Path):
    """A GPU random state recorded at save time but not visible now (fewer GPUs, CUDA not initialised
    yet) is not a mismatch; a CPU one that differs is."""
    import json

    from distrib import current
    from distrib.checkpointing import _fingerprint

    with distributed(project_dir=str(tmp_path), seed=0):
        path = save_state()
        document = json.loads((path / "fingerprint_0.json").read_text())
        document["rng"]["cuda.0"] = "not-visible-here"
        reader = _OneFileReader(path, "fingerprint_0.json", document)  # the edited fingerprint, unverified
        _fingerprint.verify(current(), reader, saved_world_size=1)
        torch.rand(1)  # the torch generator moves on: now it differs from the recorded state
        with pytest.raises(ResumeMismatchError, match="torch random state: expected hash"):
            _fingerprint.verify(current(), reader, saved_world_size=1)


class _OneFileReader:
    """Stands in for a checkpoint reader that holds one JSON document (checksums do not apply)."""

    def __init__(self, directory: Path, name: str, document: dict) -> None:
        self.directory, self._name, self._document = directory, name, document

    def has(self, name: str) -> bool:
        return name == self._name

    def json(self, name: str) -> dict:
        return self._document
