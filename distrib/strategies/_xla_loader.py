"""`XLADeviceLoader`: a prepared dataloader whose batches torch_xla uploads in the background.

torch_xla's `MpDeviceLoader` reads the wrapped loader ahead on a thread, so the wrapped loader's own
position ("is this the last batch?", "how many batches were yielded?") runs ahead of the training loop.
This wrapper keeps the position as the loop sees it, which is what `accumulate` (end-of-epoch windows)
and checkpoints (mid-epoch resume) read; everything else is forwarded to the prepared loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._runtime import Runtime


class XLADeviceLoader:
    """What `prepare(loader)` returns under strategy="xla". Example::

    loader = prepare(DataLoader(dataset, batch_size=32))   # batches arrive on the XLA device
    for x, y in loader:
        ...
    """

    def __init__(self, loader: Any, runtime: Runtime) -> None:
        self.loader = loader
        self.runtime = runtime
        self.end_of_dataloader = False
        self.batches_yielded = 0
        self._start = 0
        self._in_loop = False  # the loop is inside an epoch (the wrapped loader may have finished it)

    def __len__(self) -> int:
        return len(self.loader)

    def _device_loader(self) -> Any:
        from torch_xla.distributed.parallel_loader import MpDeviceLoader

        options = self.runtime.settings.xla
        return MpDeviceLoader(
            self.loader,
            self.runtime.device,
            loader_prefetch_size=options.loader_prefetch_size,
            device_prefetch_size=options.device_prefetch_size,
        )

    def __iter__(self) -> Iterator[Any]:
        state = self.runtime.state
        previous = state.active_dataloader
        self._start = self.loader.next_start_batch  # batches passed over by a resume
        total = self._total()
        self.end_of_dataloader = False
        self._in_loop = True
        try:
            for count, batch in enumerate(self._device_loader(), start=self._start + 1):
                state.active_dataloader = self  # the reader thread set it to the wrapped loader
                self.batches_yielded = count
                self.end_of_dataloader = total is not None and count >= total
                yield batch
        finally:
            self._in_loop = False
            self.end_of_dataloader = True
            state.active_dataloader = previous

    def _total(self) -> int | None:
        try:
            return len(self.loader)
        except TypeError:
            return None

    def remaining_in_epoch(self) -> int | None:
        """Batches left in this epoch as the loop sees it, counting the one just yielded."""
        total = self._total()
        return None if total is None else total - self.batches_yielded + 1

    def state_dict(self) -> dict[str, Any]:
        """The wrapped loader's position, at the batches the loop has actually received."""
        return dict(self.loader.state_dict(batches_yielded=self.batches_yielded if self._in_loop else None))

    def upcoming(self) -> dict[str, Any]:
        """The resume fingerprint's view of the next batch, at the loop's position."""
        return dict(self.loader.upcoming(batches_yielded=self.batches_yielded if self._in_loop else None))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self.batches_yielded = self.loader.next_start_batch

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __repr__(self) -> str:
        return f"XLADeviceLoader({self.loader!r})"
