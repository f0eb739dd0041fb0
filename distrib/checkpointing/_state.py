"""`save_state` and `load_state`: the whole training state, written atomically, verified on load."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._runtime import current
from .._version import __version__
from ..errors import CheckpointError, CheckpointMismatchError, DistribWarning
from . import _layout, _rng
from ._files import fsync_dir, temp_sibling
from ._manifest import Verify, read_manifest, verify_files, write_manifest
from ._objects import check_contents, contents, load_objects, save_objects
from ._sync import run_on_every_rank

if TYPE_CHECKING:
    from .._runtime import Runtime


@dataclass(frozen=True)
class _Plan:
    final: Path  # where the checkpoint appears when complete
    temp: Path  # where it is written until then
    rotate_root: Path | None  # the project's checkpoints folder (rotation applies), else None


def save_state(path: str | os.PathLike[str] | None = None) -> Path:
    """Save everything needed to continue training; returns the checkpoint directory. Call on every rank.

    Saved: every prepared model, optimizer and LR scheduler, the fp16 gradient scaler, each rank's random
    generator states (python, numpy, torch, CUDA), every prepared dataloader's position (epoch, batch),
    the step counters (including the position inside an accumulation window, with the gradients
    accumulated so far), objects given to `register_for_checkpointing`, and files written by hooks
    registered with `register_save_state_pre_hook`.

    With `path=None` the checkpoint goes to `<project_dir>/checkpoints/step_<optimizer_steps:06d>` (the
    `project_dir` setting is required) and only the newest `total_limit` checkpoints are kept. The save
    is atomic: files are written to a hidden temporary directory next to the target, fsynced, listed with
    their checksums in `manifest.json`, and renamed into place once every rank has finished; a crash at
    any moment leaves the previous checkpoints intact. An existing `path` is replaced only if it is a
    distrib checkpoint or an empty directory. Example::

        with distributed(project_dir="runs/exp1", total_limit=3) as ctx:
            ...
            if ctx.state.optimizer_steps % 500 == 0:
                save_state()          # runs/exp1/checkpoints/step_000500
    """
    runtime = current("save_state")
    plan = run_on_every_rank(runtime, "preparing the checkpoint", lambda: _plan(runtime, path))[0]
    assert plan is not None
    try:
        run_on_every_rank(runtime, "writing the checkpoint", lambda: _write(runtime, plan.temp))
        write_manifest(runtime, plan.temp, _metadata(runtime))
        run_on_every_rank(runtime, "publishing the checkpoint", lambda: _publish(runtime, plan))
    except BaseException:
        if runtime.rank == 0:
            shutil.rmtree(plan.temp, ignore_errors=True)
        raise
    return plan.final


def _plan(runtime: Runtime, path: str | os.PathLike[str] | None) -> _Plan | None:
    """On rank 0: choose the target, clear leftovers of interrupted saves, create the temporary dir."""
    if runtime.rank != 0:
        return None
    if path is None:
        root = _project_root(runtime, "save_state")
        root.mkdir(parents=True, exist_ok=True)
        _layout.remove_leftovers(root)
        final = _layout.new_checkpoint_path(root, runtime.state.optimizer_steps)
        rotate_root: Path | None = root
    else:
        final = Path(path).absolute()
        _check_replaceable(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        _layout.remove_leftovers(final.parent, final.name)
        rotate_root = None
    temp = temp_sibling(final, _layout.TEMP_PREFIX)
    temp.mkdir()
    return _Plan(final, temp, rotate_root)


def _project_root(runtime: Runtime, caller: str) -> Path:
    project_dir = runtime.settings.project_dir
    if project_dir is None:
        raise CheckpointError(
            f"{caller}() without a path uses the project layout, which needs the project_dir setting: "
            f"open the scope with distributed(project_dir='runs/my-run'), or pass a directory, e.g. "
            f"{caller}('checkpoints/step_100')."
        )
    return _layout.checkpoints_root(project_dir)


def _check_replaceable(final: Path) -> None:
    if final.exists() and not (_layout.is_complete(final) or (final.is_dir() and not any(final.iterdir()))):
        raise CheckpointError(
            f"save_state({str(final)!r}): that path exists and is not a distrib checkpoint; save_state "
            "replaces only an earlier checkpoint or an empty directory. Choose a new directory."
        )


def _write(runtime: Runtime, directory: Path) -> None:
    _rng.save_rng(directory, runtime.rank)  # first: hooks and writers must not disturb the saved state
    state = runtime.state
    for hook in list(state.save_hooks):
        hook(list(state.models), directory)
    runtime.strategy_module.save_training_state(runtime, directory)
    save_objects(runtime, directory)


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


def _publish(runtime: Runtime, plan: _Plan) -> None:
    """On rank 0: rename the finished temporary directory into place, then rotate old checkpoints."""
    if runtime.rank != 0:
        return
    # an explicit path that held an earlier checkpoint (checked in _plan) is moved aside, not deleted,
    # until the new one is in place
    old = _layout.move_to_trash(plan.final) if plan.final.exists() else None
    os.replace(plan.temp, plan.final)
    fsync_dir(plan.final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    limit = runtime.settings.total_limit
    if plan.rotate_root is not None and limit is not None:
        _layout.rotate(plan.rotate_root, limit, keep=plan.final)


def load_state(
    path: str | os.PathLike[str] | None = None, *, verify: Verify = "checksum", weights_only: bool = True
) -> Path | None:
    """Restore everything `save_state` saved into the prepared objects; returns the checkpoint loaded.

    `path=None` or `"latest"` picks the newest complete checkpoint under `<project_dir>/checkpoints`, and
    returns None when there is none yet, so the same script starts fresh on its first run and resumes on
    the next ones. Every file is checked against the manifest first: sizes always, checksums unless
    `verify="size"` (faster for huge checkpoints). Files are read with `torch.load(weights_only=True)`;
    `weights_only=False` allows arbitrary pickled objects in scheduler and registered-object state and
    runs their code: use it only for checkpoints you trust. Call it on every rank, after `prepare()` and
    `register_for_checkpointing()`. Example::

        model, optimizer, loader = prepare(model, optimizer, loader)
        load_state("latest")                  # None on the first run: nothing to resume
        for epoch in range(loader.epoch, num_epochs):
            for batch in loader:              # continues mid-epoch after a resume
                ...
    """
    runtime = current("load_state")
    directory: Path | None = run_on_every_rank(
        runtime, "finding the checkpoint", lambda: _resolve(runtime, path)
    )[0]
    if directory is None:
        return None
    manifest = run_on_every_rank(runtime, "reading the manifest", lambda: read_manifest(directory))[0]
    verify_files(runtime, directory, manifest, verify)
    run_on_every_rank(
        runtime, "loading the checkpoint", lambda: _load(runtime, directory, manifest, weights_only)
    )
    return directory


def _resolve(runtime: Runtime, path: str | os.PathLike[str] | None) -> Path | None:
    if runtime.rank != 0:
        return None
    if path is None or str(path) == "latest":
        return _layout.latest_checkpoint(_project_root(runtime, "load_state"))
    directory = Path(path).absolute()
    if not directory.exists():
        raise CheckpointError(f"load_state({str(path)!r}): no checkpoint there (the path does not exist).")
    newest = None if _layout.is_complete(directory) else _layout.latest_checkpoint(directory)
    if newest is not None:
        raise CheckpointError(
            f"load_state({str(path)!r}): that is a folder of checkpoints, not a checkpoint; pass one of "
            f"them, e.g. {str(newest)!r} (the newest), or use the project_dir setting and load_state('latest')."
        )
    return directory


def _load(runtime: Runtime, directory: Path, manifest: dict[str, Any], weights_only: bool) -> None:
    state = runtime.state
    check_contents(manifest.get("contents", {}), state, directory)
    _check_world_size(runtime, manifest)
    for hook in list(state.load_hooks):
        hook(list(state.models), directory)
    runtime.strategy_module.load_training_state(runtime, directory)
    load_objects(runtime, directory, weights_only=weights_only)
    if _rng.has_rng(directory, runtime.rank):
        _rng.load_rng(directory, runtime.rank)  # last, so that nothing above consumes random numbers


def _check_world_size(runtime: Runtime, manifest: dict[str, Any]) -> None:
    saved = int(manifest.get("world_size", runtime.world_size))
    if saved == runtime.world_size:
        return
    if getattr(runtime.strategy_module, "CHECKPOINT_WORLD_SIZE_DEPENDENT", True):
        raise CheckpointMismatchError(
            f"this checkpoint was saved by {saved} processes with strategy {manifest.get('strategy')!r}, "
            f"and strategy {runtime.strategy!r} can only load it with the same number; this run has "
            f"{runtime.world_size}. Relaunch with {saved} processes (e.g. --num-processes {saved}); the "
            "single, ddp and fsdp strategies load checkpoints at any world size."
        )
    # N-D parallelism: positions stay exact while the data-parallel size does, and no rank lacks its state
    same_data = (
        int(manifest.get("dp_world_size", saved)) == runtime.dp_world_size and runtime.world_size < saved
    )
    if runtime.rank == 0 and not same_data:
        warnings.warn(
            f"loading a checkpoint saved by {saved} processes into {runtime.world_size}: models and "
            "optimizers are restored exactly, but ranks without a saved random state keep their own, and "
            "dataloader positions count batches of the old world size.",
            DistribWarning,
            stacklevel=4,
        )
