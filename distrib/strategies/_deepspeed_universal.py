"""Loading a DeepSpeed checkpoint at another world size through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one optimizer partition per rank of the run that saved it. DeepSpeed's own tools
reshard it: `ds_to_universal` turns the partitions into one file per parameter and state (rank 0 runs it,
in-process, into a hidden `.universal-<name>-<random>` folder next to the checkpoint), and the engine
loads that with its `load_universal_checkpoint` mode; the folder is removed afterwards. The checkpoint's
files are verified against its manifest before the conversion reads them, and every `torch.load` of the
conversion and of the universal load is forced to `weights_only=True` with the allow-list of
`_deepspeed_checkpoint.safe_globals` (DeepSpeed's tools unpickle without restriction).

Where the conversion fails, the error names the command that converts by hand.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpointing._files import temp_sibling
from ..checkpointing._sync import broadcast_from_main, run_on_every_rank
from ..errors import CheckpointMismatchError
from ._deepspeed_files import allow_deepspeed_types, deepspeed_engines, engine_class, through

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..checkpointing._reader import CheckpointReader

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def _weights_only_everywhere() -> Iterator[None]:
    """Every `torch.load` in this block loads with `weights_only=True` (DeepSpeed's tools pass
    `weights_only=False`; torch reads this variable at each call), allowing DeepSpeed's few types."""
    previous = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with allow_deepspeed_types():
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = previous


def _manual_command(directory: Path, tag: str) -> str:
    return (
        f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {directory / tag} "
        f"--output_folder {directory}_universal/{tag} --inject_missing_state, then load it with DeepSpeed's "
        "checkpoint option load_universal: true, or relaunch with the number of processes that saved it"
    )


def _convert(reader: CheckpointReader, tags: list[str]) -> Path:
    """On rank 0: verify the engines' files, convert each to a universal checkpoint; returns the folder."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    names = [name for name in reader.names() if name.split("/")[0] in tags]
    reader.verify_files(names)
    target = temp_sibling(reader.directory, ".universal")
    for tag in tags:
        args = Namespace(
            input_folder=str(reader.directory / tag),
            output_folder=str(target / tag),
            num_extract_workers=1,  # in this process: no pool of processes to start
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # distrib's checkpoints are not Megatron's: no client state needed
        )
        log = io.StringIO()
        try:
            with _weights_only_everywhere(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as e:
            shutil.rmtree(target, ignore_errors=True)
            raise CheckpointMismatchError(
                f"DeepSpeed's universal checkpoint conversion of {str(reader.directory / tag)!r} failed "
                f"({type(e).__name__}: {e}). Convert it by hand: {_manual_command(reader.directory, tag)}."
            ) from e
        for path in (reader.directory / tag).glob("*model_states.pt"):  # the universal loader reads these too
            shutil.copyfile(path, target / tag / path.name)
    return target


def load_resharded(runtime: Runtime, reader: CheckpointReader, saved_world_size: int) -> None:
    """Load a DeepSpeed checkpoint saved by `saved_world_size` processes into this run (collective)."""
    engines = deepspeed_engines(runtime)
    tags = [f"engine_{i}" for i in range(len(engines))]
    if any(engine.zero_optimization_partition_weights() for engine in engines):
        # measured with DeepSpeed 0.19.8: the universal load restores ZeRO-3's optimizer state and master
        # weights, but the module's own partitions keep stale values until the next step, so a model
        # evaluated right after loading would be silently wrong
        raise CheckpointMismatchError(
            f"this ZeRO-3 checkpoint was saved by {saved_world_size} processes and this run has "
            f"{runtime.world_size}; distrib reshards ZeRO-1 and ZeRO-2 checkpoints through DeepSpeed's "
            f"universal checkpoint, not ZeRO-3 ones. Relaunch with {saved_world_size} processes, or convert "
            f"it: {_manual_command(reader.directory, tags[0])}."
        )
    folder = run_on_every_rank(
        runtime,
        f"converting the DeepSpeed checkpoint of {saved_world_size} processes",
        lambda: _convert(reader, tags) if runtime.rank == 0 else None,
    )[0]
    assert folder is not None, "rank 0 converts"
    try:
        run_on_every_rank(runtime, "loading the universal checkpoint", lambda: _load(engines, tags, folder))
    finally:
        broadcast_from_main(runtime, None)  # every rank has finished reading before rank 0 removes it
        if runtime.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


def _load(engines: list[Any], tags: list[str], folder: Path) -> None:
    cls = engine_class()
    for engine, tag in zip(engines, tags):
        config = engine._config
        previous = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            with through(engine, cls(None, None, trusted=folder)), _weights_only_everywhere():
                path, _ = engine.load_checkpoint(
                    str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        finally:
            config.load_universal_checkpoint = previous
        if path is None:
            raise CheckpointMismatchError(
                f"DeepSpeed could not load the universal checkpoint converted from {tag!r}; "
                f"{_manual_command(folder, tag)}."
            )
