"""Where each epoch's global order of samples comes from, drawn the same way on every rank.

The rules, in the order they apply to the DataLoader's sampler (and, for a batch sampler, to the sampler
inside it):

1. A `SequentialSampler` gives `0, 1, ..., n-1`.
2. A generator the user gave (`DataLoader(generator=g)`, `RandomSampler(generator=g)`, any sampler's
   `generator` attribute) is used exactly as torch uses it in one process: at each iteration the loader's
   generator seeds the workers, then the sampler draws its order. distrib never replaces it. Its state at
   the start of the epoch goes into checkpoints, so a resumed run draws the same order again; `prepare`
   checks that every rank's generator starts in the same state.
3. A sampler whose `generator` is None (`shuffle=True` without `generator=`) is copied, and the copy
   draws from a generator seeded by (seed, epoch), where seed is the `seed` setting or a number drawn on
   rank 0 and broadcast. The user's sampler is left as it was.
4. Any other sampler is iterated through a shallow copy (so that `set_epoch(epoch)`, when it has one, is
   called on distrib's copy). Its randomness is its own: the ranks compare each epoch's order and stop with
   a `DataError` if they drew different ones.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
from array import array
from collections.abc import Iterable, Iterator, Sized
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

from .._runtime import current_or_none
from ..errors import DataError

if TYPE_CHECKING:
    from .._runtime import Runtime

_MASK = (1 << 64) - 1
_MISSING = object()


def mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK)) & _MASK
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK
        state ^= state >> 31
    return state >> 1


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator distrib shuffles epoch `epoch` with when the user gave none."""
    return torch.Generator().manual_seed(mix(seed, epoch))


def digest(items: Any) -> int:
    """A 63-bit digest of an order (a list of indices, or of lists of indices), equal on every process."""
    hasher = hashlib.blake2b(digest_size=8)
    try:
        hasher.update(array("q", items).tobytes())
    except (TypeError, OverflowError):
        hasher.update(repr(items).encode())
    return int.from_bytes(hasher.digest(), "little") >> 1


def all_values(runtime: Runtime, value: int) -> list[int]:
    """`value` of every rank, in rank order (one small all_gather)."""
    if runtime.world_size == 1:
        return [value]
    mine = torch.tensor([value], dtype=torch.int64, device=runtime.collective_device)
    out = [torch.empty_like(mine) for _ in range(runtime.world_size)]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def decode_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class EpochOrder:
    """Draws each epoch's order from the user's sampler by the rules above, without changing it.

    `begin(epoch)` before the loader's iterator is created (it snapshots the user's generators), `draw()`
    for the order, `finish()` once the epoch was read to its end (torch's `RandomSampler` draws once more
    from its generator when it is exhausted; so does this).
    """

    def __init__(self, source: Iterable[Any], loader_generator: torch.Generator | None, seed: int) -> None:
        self.seed = seed
        self.source = source
        self.user_generators: list[torch.Generator] = []
        self._seeded: list[Any] = []
        self._epoch_aware: list[Any] = []
        if loader_generator is not None:
            self._add_user_generator(loader_generator)
        self.sampler: Iterable[Any] = self._adopt(source)
        self.controlled = _is_controlled(source)
        self.epoch_states: list[torch.Tensor] = []
        self._rest: Iterator[Any] | None = None

    # -- setup ----------------------------------------------------------------------------------------
    def _add_user_generator(self, generator: torch.Generator) -> None:
        if not any(g is generator for g in self.user_generators):
            self.user_generators.append(generator)

    def _adopt(self, obj: Any) -> Any:
        """The object distrib iterates for `obj`: `obj` itself, or a shallow copy it may configure."""
        if isinstance(obj, (range, list, tuple)) or type(obj) is SequentialSampler:
            return obj
        ours = [obj]

        def own() -> Any:
            if ours[0] is obj:
                ours[0] = copy.copy(obj)
            return ours[0]

        generator = getattr(obj, "generator", _MISSING)
        if isinstance(generator, torch.Generator):
            self._add_user_generator(generator)
        elif generator is None and _can_set(own(), "generator"):
            self._seeded.append(ours[0])
        if callable(getattr(obj, "set_epoch", None)):
            self._epoch_aware.append(own())
        inner = getattr(obj, "sampler", None)
        if isinstance(inner, Sampler) and inner is not obj:
            adopted = self._adopt(inner)
            if adopted is not inner:
                _can_set(own(), "sampler", adopted)
        return ours[0]

    # -- per epoch --------------------------------------------------------------------------------------
    def begin(self, epoch: int) -> None:
        """Prepare the draws of `epoch`; call before the loader's iterator draws its base seed."""
        self.epoch_states = [g.get_state() for g in self.user_generators]
        if self._seeded:
            generator = epoch_generator(self.seed, epoch)
            for obj in self._seeded:
                obj.generator = generator
        for obj in self._epoch_aware:
            obj.set_epoch(epoch)

    def draw(self) -> list[Any]:
        """The epoch's order, in one list."""
        self._rest = None
        sampler = self.sampler
        if isinstance(sampler, range) or type(sampler) is SequentialSampler:
            return list(range(len(sampler)))  # type: ignore[arg-type]
        if (
            type(sampler) is RandomSampler
            and any(sampler is s for s in self._seeded)
            and not sampler.replacement
            and sampler._num_samples is None
        ):
            # the draw RandomSampler.__iter__ makes, in one call instead of a Python loop per index
            return torch.randperm(len(sampler.data_source), generator=sampler.generator).tolist()  # type: ignore[arg-type]
        iterator = iter(sampler)
        if isinstance(sampler, Sized):
            # exactly len() items now; the sampler's own end (and any draw it makes there) at finish()
            self._rest = iterator
            return list(itertools.islice(iterator, len(sampler)))
        return list(iterator)

    def finish(self) -> None:
        """The epoch was read to its end: let the sampler finish as torch's loop would."""
        rest, self._rest = self._rest, None
        if rest is not None:
            for _ in rest:
                pass

    # -- checkpoints ----------------------------------------------------------------------------------
    def current_states(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.user_generators]

    def restore(self, states: list[str]) -> None:
        """Put the user's generators back in the states an epoch started with (from a checkpoint)."""
        if len(states) != len(self.user_generators):
            raise ValueError(
                f"the checkpoint holds {len(states)} dataloader generator states and this loader uses "
                f"{len(self.user_generators)} generators"
            )
        for generator, text in zip(self.user_generators, states):
            generator.set_state(decode_state(text))

    def generators_digest(self) -> int:
        return digest([x for g in self.user_generators for x in g.get_state().tolist()])


class OrderAgreement:
    """Called with each epoch's order of a sampler distrib does not control (rule 4): the ranks compare
    digests (one small all_gather per epoch) and all raise `DataError` when they drew different orders."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def __call__(self, order: list[Any]) -> None:
        values = all_values(self.runtime, digest(order))
        if len(set(values)) == 1:
            return
        differing = [rank for rank, value in enumerate(values) if value != values[0]]
        raise DataError(
            f"the ranks drew different sample orders from the DataLoader's sampler (ranks {differing} differ "
            "from rank 0), so they would train on overlapping data and miss the rest. The sampler draws "
            "from a random source distrib does not seed the same way on every rank: give it a "
            "`generator` attribute (distrib seeds it per epoch when it is None), a set_epoch(epoch) "
            "method that fixes its order, or set the seed setting if it uses the global generators."
        )


def _can_set(obj: Any, name: str, value: Any = None) -> bool:
    try:
        setattr(obj, name, value if value is not None else getattr(obj, name))
    except (AttributeError, TypeError):
        return False
    return True


def _is_controlled(source: Any) -> bool:
    """True when distrib's rules alone fix the order (every rank draws the same one by construction)."""
    if isinstance(source, (range, list, tuple)) or type(source) in (SequentialSampler, RandomSampler):
        return True
    return type(source) is BatchSampler and _is_controlled(source.sampler)


def sample_generator(index: int, *, epoch: int | None = None, seed: int | None = None) -> torch.Generator:
    """A `torch.Generator` seeded from (seed, global sample index): randomness that does not depend on
    the number of processes.

    Dropout aside, per-sample randomness (data augmentation, noise added to a sample) drawn from the
    global generator changes when the run resumes on another number of processes, because each rank
    draws for different samples. Keyed by the sample's index in the dataset, it is the same on any world
    size, on any rank and after any resume. Pass `epoch` to vary it per epoch. `seed` defaults to the
    `seed` setting, else to the shuffling seed of the run's first prepared dataloader (restored by
    `load_state`); pass it explicitly where no scope is open (e.g. in DataLoader workers started with
    spawn). Example::

        class Noisy(Dataset):
            def __getitem__(self, index):
                g = sample_generator(index)
                return self.x[index] + 0.1 * torch.randn(self.x.shape[1:], generator=g), self.y[index]
    """
    if seed is None:
        seed = _run_seed()
    values = (seed, index) if epoch is None else (seed, index, epoch + 1)
    return torch.Generator().manual_seed(mix(*values))


def _run_seed() -> int:
    runtime = current_or_none()
    if runtime is not None and runtime.settings.seed is not None:
        return runtime.settings.seed
    loaders = runtime.state.dataloaders if runtime is not None else []
    for loader in loaders:
        seed = getattr(loader, "seed", None)
        if isinstance(seed, int):
            return seed
    raise DataError(
        "sample_generator() needs a seed: set the seed setting (distributed(seed=42)), prepare a "
        "DataLoader first (its shuffling seed is used), or pass seed=... (needed where no distributed() "
        "scope is open, e.g. in DataLoader workers started with the spawn method)."
    )
