"""`profile`: `torch.profiler.profile` that writes one chrome trace per rank."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.profiler

from ._runtime import current_or_none


@contextlib.contextmanager
def profile(output_dir: str | os.PathLike[str], **profiler_kwargs: Any) -> Iterator[torch.profiler.profile]:
    """Profile the block with `torch.profiler.profile` and write `<output_dir>/trace_rank{rank}.json`.

    Every rank writes its own trace (open them in Perfetto or chrome://tracing). Keywords go to
    `torch.profiler.profile` (`activities=`, `record_shapes=`, `profile_memory=`, `with_stack=`, ...).
    With a `schedule=`, each finished cycle is written as `trace_rank{rank}_step{N}.json` instead,
    unless you pass your own `on_trace_ready=`. Outside a scope it acts as rank 0. Example::

        with profile("traces", record_shapes=True) as prof:
            for batch in loader:
                train_step(batch)
                prof.step()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10))
    """
    runtime = current_or_none()
    rank = 0 if runtime is None else runtime.rank
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    scheduled = profiler_kwargs.get("schedule") is not None
    if scheduled:
        profiler_kwargs.setdefault("on_trace_ready", _cycle_writer(directory, rank))
    with torch.profiler.profile(**profiler_kwargs) as prof:
        yield prof
    if not scheduled:
        prof.export_chrome_trace(str(directory / f"trace_rank{rank}.json"))


def _cycle_writer(directory: Path, rank: int) -> Callable[[torch.profiler.profile], None]:
    def write(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(directory / f"trace_rank{rank}_step{prof.step_num}.json"))

    return write
