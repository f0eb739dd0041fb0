"""`progress_bar`: a tqdm bar shown once per machine, on the local main process."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._runtime import current_or_none
from .errors import missing_extra


def progress_bar(iterable: Iterable[Any] | None = None, **tqdm_kwargs: Any) -> Any:
    """Wrap `iterable` in a `tqdm` bar that shows on the local main process only.

    The other processes get a disabled bar that iterates just the same and prints nothing, so bars
    from several processes never interleave. Keywords go to `tqdm.auto.tqdm` (`total=`, `desc=`,
    `disable=`, ...). A prepared dataloader that `load_state` resumed mid-epoch starts the bar at the
    resumed batch (`initial=`), so it ends at `len(loader)`. Outside a scope it behaves as one process and
    shows the bar. Needs tqdm
    (`pip install 'distrib[tqdm]'`). Example::

        for batch in progress_bar(loader, desc="epoch 1"):
            ...

        bar = progress_bar(total=num_steps)     # or update it by hand
        bar.update(1)
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise missing_extra("tqdm", "tqdm", "progress_bar()") from None
    runtime = current_or_none()
    shown = runtime is None or runtime.is_local_main_process
    tqdm_kwargs["disable"] = bool(tqdm_kwargs.get("disable", False)) or not shown
    start = getattr(iterable, "next_start_batch", None)  # a prepared loader resumed mid-epoch
    if isinstance(start, int) and start and "initial" not in tqdm_kwargs:
        tqdm_kwargs["initial"] = start
        tqdm_kwargs.setdefault("total", len(iterable))  # type: ignore[arg-type]
    return tqdm(iterable, **tqdm_kwargs)
