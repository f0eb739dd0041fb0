"""`PreparedDataLoader`: a DataLoader that yields this rank's batches on the run's device.

Each epoch's order is drawn the same way on every rank (`order.py`: the user's generator as torch would
use it, else one seeded by (seed, epoch); no `set_epoch` call needed), and the loader keeps a global
position (epoch, units of that order consumed) so that a run resumes mid-epoch, on any number of
processes, without re-reading skipped samples (`position.py`, `resume.py`). It flags the last batch of an
epoch so `accumulate` synchronises there and `gather_for_metrics` drops the padding `even_batches` added.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from .._preemption import at_step_boundary, loader_ended
from .._runtime import current
from .._straggler import timed_batches
from .._tree import send_to_device
from ..errors import CheckpointMismatchError, DataError, DistribWarning, PrepareError, ResumeMismatchError
from .order import all_values, encode_state, epoch_generator
from .position import Position, read_position
from .resume import Geometry, Script, plan_resume
from .sharding import ShardedIterableDataset, _Shard

if TYPE_CHECKING:
    from .._runtime import Runtime

#: DataLoader arguments a prepared loader copies from the user's loader
_LOADER_ARGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "persistent_workers",
    "pin_memory_device",
)
#: TrainingState.extensions key: the loader that changed the run's accumulation steps in this load_state
_ACCUMULATION_OWNER = "data.accumulation_changed_by"


def loader_arguments(loader: DataLoader) -> dict[str, Any]:  # type: ignore[type-arg]
    """The worker, collation and pinning arguments of `loader`, to build its prepared replacement with."""
    common = {name: getattr(loader, name) for name in _LOADER_ARGS}
    if loader.num_workers > 0:
        common["prefetch_factor"] = loader.prefetch_factor
    return common


_END = object()


def _watches_preemption(runtime: Runtime) -> bool:
    return "preemption" in runtime.state.extensions


class PreparedDataLoader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader sharded for this rank. Created by `prepare(loader)`; not built directly.

    `epoch` is the epoch of the current (or last) iteration, and after `load_state` the epoch the next
    iteration runs; `batches_yielded` counts this rank's batches of that epoch, including those a resume
    passed over (`start_batch`).
    """

    def __init__(
        self, *args: Any, runtime: Runtime, seed: int, source: DataLoader, shard: _Shard, **kwargs: Any
    ):  # type: ignore[type-arg]
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        self.seed = seed
        self.source = source
        self.shard = shard
        self.epoch = 0
        self.batches_yielded = 0
        self.start_batch = 0
        self.end_of_dataloader = False
        self._next_epoch = 0
        self._pending = 0  # units of the next epoch's order to pass over (a resume, skip_first_batches)
        self._start = 0  # units passed over by the current iteration
        self._iterating = False
        self._trains = False  # an optimizer stepped during one of its iterations
        self._steps_at_start = 0
        self._move = runtime.settings.device_placement
        self._device = runtime.device
        self._user_generator = source.generator
        settings = runtime.settings
        self._script = Script(source.batch_size, settings.gradient_accumulation_steps, settings.split_batches)
        if shard.epoch_order is not None and self.batch_sampler is not None:
            # the user's sampler, read-only (without automatic batching DataLoader iterates .sampler itself)
            object.__setattr__(self, "sampler", source.sampler)

    # -- geometry -------------------------------------------------------------------------------------
    def _per_rank(self) -> int:
        """Units (samples, or a batch sampler's batches) each rank takes per micro-step."""
        return self.shard.cutter.batch_size

    def _set_per_rank(self, batch_size: int) -> None:
        self.shard.cutter.batch_size = batch_size
        if isinstance(self.shard, ShardedIterableDataset):
            self.batch_sampler.batch_size = batch_size  # type: ignore[union-attr]  # ours: DataLoader built it
            object.__setattr__(self, "batch_size", batch_size)

    def _units_per_batch(self) -> int:
        return self._per_rank() * self.runtime.dp_world_size

    def _num_units(self) -> int | None:
        return self.shard.num_units()

    def _geometry(self) -> Geometry:
        return Geometry(
            self._per_rank(), self.runtime.dp_world_size, self.runtime.gradient_accumulation_steps
        )

    @property
    def next_start_batch(self) -> int:
        """This rank's batches of the epoch that the next iteration passes over (after a resume or
        `skip_first_batches`; progress bars start there)."""
        return self._batches_before(self._pending)

    def _batches_before(self, start: int) -> int:
        """This rank's batches of the epoch that lie before unit `start` (shown by progress bars)."""
        if not start:
            return 0
        total, units = (len(self), self._num_units()) if self._has_len() else (None, None)
        if total is None or units is None:
            return start // self._units_per_batch()
        return max(0, total - self.shard.cutter.num_batches(units, start))

    # -- position -------------------------------------------------------------------------------------
    def state_dict(self, batches_yielded: int | None = None) -> dict[str, Any]:
        """The global position of the next batch, for checkpoints (`position.py` describes the format).

        During an iteration that is the rest of the current epoch (empty after its last batch); after an
        iteration ended, the start of the next epoch. `batches_yielded`, from a wrapper that reads ahead
        (XLA), is the count of batches its loop has received in the current epoch."""
        order = self.shard.epoch_order
        in_epoch = self._iterating or batches_yielded is not None
        if in_epoch:
            done = (self.batches_yielded if batches_yielded is None else batches_yielded) - self.start_batch
            consumed, padding = self.shard.cutter.position(self._start, done, self._num_units())
            epoch, states = self.epoch, (order.epoch_states if order is not None else [])
        else:
            consumed, padding, epoch = self._pending, 0, self._next_epoch
            states = order.current_states() if order is not None else []
        return Position(
            seed=self.seed,
            epoch=epoch,
            consumed=consumed,
            unit=self.shard.unit,
            geometry=self._geometry(),
            script=self._script,
            padding=padding,
            num_units=self._num_units(),
            trains=self._trains or self._stepped(),
            generators=[encode_state(s) for s in states],
            batches_yielded=self.batches_yielded if batches_yielded is None else batches_yielded,
            samples_consumed=self._samples_in(consumed) if in_epoch else None,
        ).to_dict()

    def _samples_in(self, consumed: int) -> int | None:
        order = self.shard.order
        if self.shard.unit != "batches" or order is None:
            return None
        return sum(len(batch) for batch in order[:consumed])

    def _stepped(self) -> bool:
        return self._iterating and self.runtime.state.optimizer_steps > self._steps_at_start

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues the saved epoch after the units it had consumed (nothing
        when the saved iteration had yielded its last batch), on any number of processes."""
        position = read_position(state, unit=self.shard.unit, now=self._geometry(), script=self._script)
        units = self._num_units()
        if position.num_units is not None and units is not None and position.num_units != units:
            raise CheckpointMismatchError(
                f"{self._name()}: the checkpoint's position is in an epoch of {position.num_units} "
                f"{position.unit} and this dataloader has {units}; resume with the same dataset (and "
                "sampler) as the run that saved it."
            )
        self._adopt_geometry(position)
        self.seed = position.seed
        order = self.shard.epoch_order
        if order is not None:
            order.seed = position.seed
            if position.generators or order.user_generators:
                try:
                    order.restore(position.generators)
                except ValueError as e:
                    raise CheckpointMismatchError(f"{self._name()}: {e}; pass the same generators.") from None
        consumed = min(position.consumed, units) if units is not None else position.consumed
        self._next_epoch = self.epoch = position.epoch
        self._pending = consumed
        self.start_batch = self.batches_yielded = self._batches_before(consumed)
        self._trains = position.trains

    def _adopt_geometry(self, saved: Position) -> None:
        """Keep the checkpoint's global batch at this world size (`resume.py`), saying what changed."""
        runtime = self.runtime
        plan = plan_resume(
            saved.geometry,
            saved.script,
            self._geometry(),
            self._script,
            batch_fixed=self.shard.unit == "batches",
            trains=saved.trains,
            name=self._name(),
        )
        if plan.batch_size != self._per_rank():
            self._set_per_rank(plan.batch_size)
        if plan.accumulation is not None:
            owner = runtime.state.extensions.get(_ACCUMULATION_OWNER)
            if owner is not None and runtime.gradient_accumulation_steps != plan.accumulation:
                raise CheckpointMismatchError(
                    f"{owner} and {self._name()} need different gradient accumulation steps to keep their "
                    f"global batches on {runtime.dp_world_size} data-parallel processes; relaunch with "
                    f"{saved.geometry.world_size} processes or set their batch sizes in the script."
                )
            runtime.state.gradient_accumulation_steps = plan.accumulation
            runtime.state.extensions[_ACCUMULATION_OWNER] = self._name()
        if plan.note:
            warnings.warn(plan.note, DistribWarning, stacklevel=2)

    def _name(self) -> str:
        for i, loader in enumerate(self.runtime.state.dataloaders):
            if loader is self or getattr(loader, "loader", None) is self:
                return f"dataloader #{i}"
        return "the dataloader"

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (optional: epochs advance by themselves)."""
        if self._pending and epoch != self._next_epoch:
            raise DataError(
                f"set_epoch({epoch}) on a dataloader that load_state resumed in the middle of epoch "
                f"{self._next_epoch}: the run would skip the rest of that epoch. Start your epoch loop at "
                f"loader.epoch (for epoch in range(loader.epoch, num_epochs)), or call set_epoch("
                f"{self._next_epoch}) first."
            )
        self._next_epoch = epoch

    def skip_next(self, num_batches: int) -> None:
        units = num_batches * self._units_per_batch()
        if self._pending and units != self._pending:
            raise DataError(
                f"skip_first_batches(loader, {num_batches}) on a dataloader that load_state already put "
                f"after {self.start_batch} batches of epoch {self._next_epoch}: prepared dataloaders resume "
                "by themselves, so skipping again would drop data. Remove the skip_first_batches call."
            )
        self._pending = units
        self.start_batch = self._batches_before(units)

    # -- resume self-check (checkpointing/_fingerprint.py) -------------------------------------------------
    def upcoming(self, batches_yielded: int | None = None) -> dict[str, Any]:
        """Where the next batch comes from, for the checkpoint's fingerprint: the epoch, the units consumed
        and the next global batch's units (`[]`: the epoch has no more; None: not known yet)."""
        state = self.state_dict(batches_yielded)
        consumed = int(
            state["batches_consumed"] if "batches_consumed" in state else state["samples_consumed"]
        )
        upcoming: list[Any] | None = None
        order = self.shard.order
        if (self._iterating or batches_yielded is not None) and order is not None:
            upcoming = self.shard.cutter.global_batch(order, consumed)
        return {"epoch": state["epoch"], "consumed": consumed, "next": upcoming}

    def expect_next(self, recorded: dict[str, Any]) -> None:
        """After load_state: check the restored position now, and the first batch when it is drawn."""
        found = (self._next_epoch, self._pending)
        expected = (int(recorded["epoch"]), int(recorded["consumed"]))
        if found != expected:
            raise ResumeMismatchError(
                f"{self._name()} would resume at epoch {found[0]} after {found[1]} {self.shard.unit}, but the "
                f"run was saved at epoch {expected[0]} after {expected[1]}: the restored position is wrong."
            )
        units = recorded.get("next")
        if units is not None:
            self.shard.first_check = _FirstBatchCheck(
                self, units, self._check_slice(), self._collective_check()
            )

    def _check_slice(self) -> tuple[int, int]:
        """The units of a global batch that this rank draws first."""
        rank, size = self.runtime.dp_rank, (1 if self.shard.unit == "batches" else self._per_rank())
        return rank * size, (rank + 1) * size

    def _collective_check(self) -> bool:
        return True

    # -- iteration ------------------------------------------------------------------------------------
    def _begin_epoch(self) -> None:
        epoch = self.epoch = self._next_epoch
        self._next_epoch += 1
        start, self._pending = self._pending, 0
        order = self.shard.epoch_order
        if order is not None:
            order.begin(epoch)
        if self._user_generator is None:
            # torch draws each iterator's base seed from this generator: seeded per epoch, starting an
            # epoch leaves the global random state alone, so a run resumed mid-epoch draws what it would have
            self.generator = epoch_generator(self.seed, epoch)
        dataset_set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(dataset_set_epoch):
            dataset_set_epoch(epoch)
        self.shard.start = self._start = start
        self.start_batch = self.batches_yielded = self._batches_before(start)
        self._steps_at_start = self.runtime.state.optimizer_steps

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._begin_epoch()
        state = self.runtime.state
        previous, state.active_dataloader = state.active_dataloader, self
        self.end_of_dataloader = False
        self._iterating = True
        try:
            yield from self._batches()
        finally:
            self._trains = self._trains or self._stepped()
            self._iterating = False
            if self._ragged():
                loader_ended(self.runtime)
            self.end_of_dataloader = True
            if state.active_dataloader is self:
                state.active_dataloader = previous

    def _batches(self) -> Iterator[Any]:
        total = len(self) if self._has_len() else None
        count = self.start_batch
        iterator = timed_batches(self.runtime, super().__iter__())
        self.shard.start = 0  # the new iterator has taken it (DataLoader may call iter() on it twice)
        if total is None:
            yield from self._batches_with_lookahead(iterator, count)
            return
        # object.__setattr__ skips DataLoader's Python-level __setattr__ check on every batch
        set_attribute = object.__setattr__
        move, device = self._move and self._device.type != "cpu", self._device
        state, boundary = self.runtime.state, at_step_boundary if _watches_preemption(self.runtime) else None
        agreed_until = self._batches_on_every_rank(count)
        while True:
            if boundary is not None and state.micro_step == 0 and count <= agreed_until:
                boundary(self.runtime, self)  # before the first batch of a window: preemption is agreed here
            batch = next(iterator, _END)
            if batch is _END:
                return
            count += 1
            set_attribute(self, "batches_yielded", count)
            set_attribute(self, "end_of_dataloader", count >= total)
            yield send_to_device(batch, device, non_blocking=True) if move else batch

    def _ragged(self) -> bool:
        """Whether the ranks may get different numbers of batches in an epoch (`even_batches=False`)."""
        return not self.shard.cutter.same_count_everywhere()

    def _batches_on_every_rank(self, start_batch: int) -> float:
        """The count of batches yielded up to which every rank of the epoch is still iterating, so the
        preemption agreement (a collective) is made at the same boundaries on all of them. Without
        `even_batches` the final batches are ragged: ranks with fewer stop agreeing when they end, and
        the others stop with them (`join_uneven_inputs`, an evaluation loop with local metrics)."""
        cutter = self.shard.cutter
        if cutter.same_count_everywhere():
            return float("inf")
        units = self._num_units() if self._has_len() else None
        if units is None:
            return -1  # a stream of unknown length, cut unevenly: ranks may end anywhere
        return start_batch + cutter.num_batches(units, self._start, rank=cutter.world_size - 1)

    def _batches_with_lookahead(self, iterator: Iterator[Any], count: int) -> Iterator[Any]:
        # without a length, the last batch is known only when the next fetch fails; a batch fetched ahead
        # is not counted as yielded, so a checkpoint taken at a boundary resumes with it
        state = self.runtime.state
        watch = _watches_preemption(self.runtime) and self.shard.cutter.same_count_everywhere()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        for upcoming in iterator:
            if watch and state.micro_step == 0:
                at_step_boundary(self.runtime, self)
            count += 1
            self.batches_yielded = count
            yield send_to_device(batch, self._device, non_blocking=True) if self._move else batch
            batch = upcoming
        if watch and state.micro_step == 0:
            at_step_boundary(self.runtime, self)
        self.batches_yielded = count + 1
        self.end_of_dataloader = True
        yield send_to_device(batch, self._device, non_blocking=True) if self._move else batch

    @property
    def remainder(self) -> int | None:
        """Real samples (over all ranks) in the final global batch of this epoch, if it was padded."""
        return getattr(self.shard, "remainder", None)

    def _has_len(self) -> bool:
        try:
            len(self)
        except TypeError:
            return False
        return True

    def __len__(self) -> int:
        return len(self.batch_sampler) if self.batch_sampler is not None else super().__len__()  # type: ignore[arg-type]

    def remaining_in_epoch(self) -> int | None:
        """Batches left in this epoch, counting the one just yielded; None for iterable datasets."""
        if not self._has_len():
            return None
        return len(self) - self.batches_yielded + 1


class _FirstBatchCheck:
    """Compares the first batch a resumed loader draws with the one recorded at save time. With
    `collective`, every rank takes part (one small all_gather), so a mismatch on one rank stops them all
    instead of leaving the others waiting in the next collective."""

    def __init__(
        self, loader: PreparedDataLoader, units: list[Any], part: tuple[int, int], collective: bool
    ) -> None:
        self.loader = loader
        self.units = units  # the saved run's next global batch (padded as it was), [] at the epoch's end
        self.part = part  # which of those units this rank draws first, under this run's geometry
        self.collective = collective

    def expected(self) -> list[Any] | None:
        """This rank's part of the recorded batch ([]: not known; None: no batch at all)."""
        return self.units[self.part[0] : self.part[1]] if self.units else None

    def __call__(self, first: Any) -> None:
        expected = self.expected()
        found = None if first is None else _normal([first] if self.loader.shard.unit == "batches" else first)
        if expected is None:
            ok = found is None
        else:
            ok = not expected or (found is not None and found[: len(expected)] == _normal(expected))
        verdicts = all_values(self.loader.runtime, int(ok)) if self.collective else [int(ok)]
        if all(verdicts):
            return
        rank = self.loader.runtime.rank
        bad = [r for r, v in enumerate(verdicts) if not v] if self.collective else [rank]
        wanted = "no batch (the saved epoch had ended)" if expected is None else repr(expected)
        detail = f"expected {wanted}, found {found!r}" if not ok else "this rank's batch matched"
        raise ResumeMismatchError(
            f"{self.loader._name()}: the first batch after load_state is not the one the saved run would have "
            f"drawn next (rank(s) {bad} differ; on rank {rank}: {detail}). The resumed run would replay, "
            "skip or reorder data. A sampler must draw its order from its generator, from "
            "set_epoch(epoch), or from the DataLoader's generator to resume exactly."
        )


def _normal(units: Any) -> list[Any]:
    return [[int(i) for i in u] if isinstance(u, (list, tuple)) else int(u) for u in units]


def skip_first_batches(loader: DataLoader, num_batches: int) -> DataLoader:  # type: ignore[type-arg]
    """Make the next iteration of a prepared loader start after `num_batches` batches (not loaded).

    Returns the same loader, so it reads like Accelerate's helper. Not needed after `load_state`, which
    puts prepared loaders back where they were (calling it then with another count raises `DataError`).
    Example::

        for batch in skip_first_batches(train_loader, 120):
            ...
    """
    current("skip_first_batches")
    target = getattr(loader, "loader", loader)  # strategies may wrap the prepared loader (XLA)
    if not isinstance(target, PreparedDataLoader):
        raise PrepareError("skip_first_batches() needs a DataLoader returned by prepare(); prepare it first.")
    if num_batches < 0:
        raise PrepareError(f"skip_first_batches(num_batches={num_batches}) needs a number >= 0.")
    target.skip_next(num_batches)
    return loader
