"""`save_state` and `load_state`: the whole training state, written atomically, verified as it is read.

The parts of a checkpoint are listed once, in `_stage` (saving) and `_restore` (loading): random states,
hooks, the strategy's models and optimizers, schedulers, counters and dataloader positions, registered
objects, then the `EXTRA_PARTS`. A feature that adds a part appends one `(save, load)` pair there:
`save(runtime, writer)` runs on every rank while the state is snapshotted (after every other part, so it
sees what they saw; write with `writer.json(name, value)`, `writer.tensors(...)`, ...), and
`load(runtime, reader)` runs on every rank after everything else was restored, random states included
(read with `reader.json(name)`; `reader.has(name)` for checkpoints written before the part existed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch

from .. import strategies
from .._runtime import current
from .._version import __version__
from ..errors import CheckpointError, CheckpointMismatchError
from . import _background, _faults, _fingerprint, _layout, _rng
from ._background import SaveHandle
from ._commit import commit, discard_temp, make_plan, project_root
from ._manifest import Verify, read_manifest
from ._objects import check_contents, contents, load_objects, save_objects
from ._reader import CheckpointReader
from ._sync import run_on_every_rank
from ._writer import CheckpointWriter

if TYPE_CHECKING:
    from .._runtime import Runtime


@overload
def save_state(path: str | os.PathLike[str] | None = None, *, background: Literal[False]) -> Path: ...
@overload
def save_state(path: str | os.PathLike[str] | None = None, *, background: Literal[True]) -> SaveHandle: ...
@overload
def save_state(
    path: str | os.PathLike[str] | None = None, *, background: None = None
) -> Path | SaveHandle: ...


def save_state(
    path: str | os.PathLike[str] | None = None, *, background: bool | None = None
) -> Path | SaveHandle:
    """Save everything needed to continue training; returns the checkpoint directory. Call on every rank.

    Saved: every prepared model, optimizer and LR scheduler, the fp16 gradient scaler, each rank's random
    generator states (python, numpy, torch, CUDA), every prepared dataloader's position (epoch, batch),
    the step counters (including the position inside an accumulation window, with the gradients
    accumulated so far), objects given to `register_for_checkpointing`, and files written by hooks
    registered with `register_save_state_pre_hook`.

    With `path=None` the checkpoint goes to `<project_dir>/checkpoints/step_<optimizer_steps:06d>` (the
    `project_dir` setting is required) and only the newest `total_limit` checkpoints are kept (newest by
    the order they were saved in). The save is atomic: files are written to a hidden temporary directory
    next to the target, fsynced, listed with their sizes and CRC-32C checksums (computed as they are
    written) in `manifest.json`, and put in place once every rank has finished; a crash at any moment
    leaves the previous checkpoints intact, and an explicit `path` that held a checkpoint holds a complete
    one at every moment. An existing `path` is replaced only if it is a distrib checkpoint or an empty
    directory. A failure on any rank raises the same error on every rank.

    `background=True` (default: the `background_saves` setting) returns a `SaveHandle` as soon as the
    state is copied to CPU memory and writes the checkpoint in a background thread with the same
    guarantees; changes to the model after the call do not reach the checkpoint. One save is in flight at
    a time: the next `save_state`, a `load_state` and the scope's exit wait for it, and raise its error if
    it failed (unless `handle.wait()` already did). Example::

        with distributed(project_dir="runs/exp1", total_limit=3) as ctx:
            ...
            if ctx.state.optimizer_steps % 500 == 0:
                save_state()                      # runs/exp1/checkpoints/step_000500
                # or: handle = save_state(background=True); ...; handle.wait()
    """
    runtime = current("save_state")
    if runtime.state.in_accumulate:
        raise CheckpointError(
            "save_state() was called inside `with accumulate(...)`, where the micro-batch's backward may or "
            "may not have run yet, so the checkpoint could not say where the window stands. Call it after "
            "the block (between micro-batches, or after optimizer.step()): a checkpoint taken in the middle of "
            "a window keeps the gradients accumulated so far and is named step_<N>-micro_<k>."
        )
    saver = _background.saver(runtime)
    saver.settle()  # at most one save in flight; its error surfaces here if nobody saw it
    if background is None:
        background = runtime.settings.background_saves
    plan = run_on_every_rank(runtime, "preparing the checkpoint", lambda: make_plan(runtime, path))[0]
    assert plan is not None, "rank 0 plans every save"
    _faults.point("after_plan", runtime.rank)
    group = saver.group() if background else None
    writer = CheckpointWriter(
        plan.temp,
        runtime.rank,
        snapshots=saver.snapshots if background else None,
        process_group=group,
        final=plan.final,
    )
    try:
        metadata = run_on_every_rank(runtime, "writing the checkpoint", lambda: _stage(runtime, writer))[0]
    except BaseException:
        discard_temp(runtime, plan)
        raise
    assert metadata is not None, "rank 0 describes every save"
    if not background:
        commit(runtime, plan, writer, metadata)
        return plan.final

    def in_background() -> None:
        _faults.point("background_write", runtime.rank)
        commit(runtime, plan, writer, metadata, group)

    return saver.start(plan.final, in_background)


SavePart = Callable[["Runtime", CheckpointWriter], None]
LoadPart = Callable[["Runtime", CheckpointReader], None]
#: (save, load) pairs of the parts features add to every checkpoint (see the module docstring)
EXTRA_PARTS: list[tuple[SavePart, LoadPart]] = []


def _stage(runtime: Runtime, writer: CheckpointWriter) -> dict[str, Any] | None:
    """Write (or, in the background, snapshot) every part of the checkpoint on this rank."""
    _rng.save_rng(writer, runtime.rank)  # first: hooks and writers must not disturb the saved state
    _fingerprint.record(runtime, writer)  # what the run does next, checked after load_state
    state = runtime.state
    metadata = _metadata(runtime) if runtime.rank == 0 else None
    failure: BaseException | None = None
    try:
        for hook in list(state.save_hooks):
            hook(list(state.models), writer.directory)
    except Exception as e:  # the strategy's part below is collective: every rank must reach it
        failure = e
    runtime.strategy_module.save_training_state(runtime, writer)
    if failure is not None:
        raise failure
    save_objects(runtime, writer)
    for save, _ in EXTRA_PARTS:
        save(runtime, writer)
    writer.settle()
    return metadata


def _metadata(runtime: Runtime) -> dict[str, Any]:
    return {
        "distrib_version": __version__,
        "torch_version": torch.__version__,
        "strategy": runtime.strategy,
        "world_size": runtime.world_size,
        "dp_world_size": runtime.dp_world_size,  # N-D parallelism: what dataloader positions count in
        "step": runtime.state.optimizer_steps,
        "mixed_precision": runtime.mixed_precision,
        "gradient_accumulation_steps": runtime.gradient_accumulation_steps,
        "contents": contents(runtime.state),
    }


def load_state(
    path: str | os.PathLike[str] | None = None, *, verify: Verify = "checksum", weights_only: bool = True
) -> Path | None:
    """Restore everything `save_state` saved into the prepared objects; returns the checkpoint loaded.

    `path=None` or `"latest"` picks the newest complete checkpoint under `<project_dir>/checkpoints` (the
    one saved last), and returns None when there is none yet, so the same script starts fresh on its first
    run and resumes on the next ones. Only files the manifest lists are read, each checked while it is
    read: its size always, its CRC-32C checksum unless `verify="size"` (faster for huge checkpoints). A
    file that fails raises `CheckpointCorruptError` naming it; the objects loaded so far may then hold
    part of the checkpoint, so load another one before training on. Nothing is unpickled by default:
    tensors are safetensors, the rest JSON or `torch.load(weights_only=True)`; `weights_only=False` allows
    arbitrary pickled objects in optimizer, scheduler and registered-object state and runs their code:
    use it only for checkpoints you trust. Call it on every rank, after `prepare()` and
    `register_for_checkpointing()`; a background save in flight is finished first. Example::

        model, optimizer, loader = prepare(model, optimizer, loader)
        load_state("latest")                  # None on the first run: nothing to resume
        for epoch in range(loader.epoch, num_epochs):
            for batch in loader:              # continues mid-epoch after a resume
                ...
    """
    runtime = current("load_state")
    _background.settle(runtime)
    if verify not in ("checksum", "size"):
        raise CheckpointError(f"load_state(verify={verify!r}): verify must be 'checksum' or 'size'.")
    directory: Path | None = run_on_every_rank(
        runtime, "finding the checkpoint", lambda: _resolve(runtime, path)
    )[0]
    if directory is None:
        return None
    manifest = run_on_every_rank(runtime, "reading the manifest", lambda: read_manifest(directory))[0]
    reader = CheckpointReader(directory, manifest, verify=verify, weights_only=weights_only)
    run_on_every_rank(runtime, "checking the checkpoint", lambda: _check(runtime, reader))
    run_on_every_rank(runtime, "loading the checkpoint", lambda: _restore(runtime, reader))
    return directory


def _resolve(runtime: Runtime, path: str | os.PathLike[str] | None) -> Path | None:
    if runtime.rank != 0:
        return None
    if path is None or str(path) == "latest":
        return _layout.latest_checkpoint(project_root(runtime, "load_state"))
    directory = Path(path).absolute()
    _layout.recover(directory)  # an explicit path whose replacement was interrupted
    if not directory.exists():
        raise CheckpointError(f"load_state({str(path)!r}): no checkpoint there (the path does not exist).")
    newest = None if _layout.is_complete(directory) else _layout.latest_checkpoint(directory)
    if newest is not None:
        raise CheckpointError(
            f"load_state({str(path)!r}): that is a folder of checkpoints, not a checkpoint; pass one of "
            f"them, e.g. {str(newest)!r} (the newest), or use the project_dir setting and load_state('latest')."
        )
    return directory


def _check(runtime: Runtime, reader: CheckpointReader) -> None:
    """Before anything is loaded: the checkpoint fits this run, the files hooks read are verified, and
    the load hooks ran (on every rank, agreed, before the strategy's collective loading starts)."""
    state = runtime.state
    check_contents(reader.manifest.get("contents", {}), state, reader.directory)
    _check_world_size(runtime, reader.manifest)
    reader.verify_files(reader.hook_files())
    for hook in list(state.load_hooks):
        hook(list(state.models), reader.directory)


def _restore(runtime: Runtime, reader: CheckpointReader) -> None:
    runtime.strategy_module.load_training_state(runtime, reader)
    load_objects(runtime, reader)
    saved_world_size = int(reader.manifest["world_size"])
    # after the objects, so that nothing above consumes random numbers; a rank that did not exist at save
    # time takes the states of rank (rank % saved world size)
    source = _fingerprint.rng_source_rank(runtime.rank, saved_world_size)
    if _rng.has_rng(reader, source):
        _rng.load_rng(reader, source)
    _fingerprint.verify(runtime, reader, saved_world_size)
    for _, load in EXTRA_PARTS:
        load(runtime, reader)
    state = runtime.state
    state.resumed_step = state.optimizer_steps
    for listener in list(state.resume_listeners):
        listener()


def _check_world_size(runtime: Runtime, manifest: dict[str, Any]) -> None:
    saved = int(manifest["world_size"])
    if saved == runtime.world_size:
        return
    if runtime.strategy_module.CHECKPOINT_WORLD_SIZE_DEPENDENT:
        resharding = [
            n for n in strategies.REGISTRY if not strategies.load(n).CHECKPOINT_WORLD_SIZE_DEPENDENT
        ]
        raise CheckpointMismatchError(
            f"this checkpoint was saved by {saved} processes with strategy {manifest.get('strategy')!r}, "
            f"and strategy {runtime.strategy!r} can only load it with the same number; this run has "
            f"{runtime.world_size}. Relaunch with {saved} processes (e.g. --num-processes {saved}); the "
            f"{', '.join(resharding)} strategies load checkpoints at any world size."
        )
    # data positions are global and ranks that did not exist take rank % saved's random states (_restore)
