"""The protocol of a save: plan, write, manifest, publish, each step agreed by every rank.

1. Plan (rank 0): pick the name, repair or clear leftovers of interrupted saves, create the hidden
   temporary directory, take the next save counter.
2. Write (every rank): files go into the temporary directory through `CheckpointWriter`.
3. Manifest (rank 0): the files every rank recorded (sizes and CRC-32C computed while writing), plus
   the files hooks wrote (read back once), go into `manifest.json`, fsynced with the directory.
4. Publish (rank 0): the directory is renamed into place (an explicit path that held a checkpoint is
   exchanged atomically, see `_layout.replace`), then old checkpoints are rotated.

Every step runs inside `run_on_every_rank`, so a failure on any rank (a full disk while rank 0 writes the
manifest included) reaches every rank as the same error, and the temporary directory is removed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from . import _faults, _layout
from ._files import fsync_dir, temp_sibling
from ._io import os_error
from ._manifest import build, describe_unrecorded, list_files, write_manifest
from ._objects import window_position
from ._sync import run_on_every_rank

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ._writer import CheckpointWriter


@dataclass(frozen=True)
class Plan:
    final: Path  # where the checkpoint appears when complete
    temp: Path  # where it is written until then
    rotate_root: Path | None  # the project's checkpoints folder (rotation applies), else None
    save_counter: int


def project_root(runtime: Runtime, caller: str) -> Path:
    project_dir = runtime.settings.project_dir
    if project_dir is None:
        raise CheckpointError(
            f"{caller}() without a path uses the project layout, which needs the project_dir setting: "
            f"open the scope with distributed(project_dir='runs/my-run'), or pass a directory, e.g. "
            f"{caller}('checkpoints/step_100')."
        )
    return _layout.checkpoints_root(project_dir)


def make_plan(runtime: Runtime, path: str | os.PathLike[str] | None) -> Plan | None:
    """On rank 0: choose the target, clear leftovers of interrupted saves, create the temporary dir."""
    if runtime.rank != 0:
        return None
    if path is None:
        root = project_root(runtime, "save_state")
        _mkdir(root)
        _layout.remove_leftovers(root)
        micro_step, _ = window_position(runtime.state)
        final = _layout.new_checkpoint_path(root, runtime.state.optimizer_steps, micro_step)
        rotate_root: Path | None = root
    else:
        final = Path(path).absolute()
        _mkdir(final.parent)
        _layout.remove_leftovers(final.parent, final.name)
        _check_replaceable(final)
        rotate_root = None
    temp = temp_sibling(final, _layout.TEMP_PREFIX)
    try:
        temp.mkdir()
    except OSError as e:
        raise os_error(e, "creating the directory", temp, final) from e
    return Plan(final, temp, rotate_root, _layout.next_counter(final.parent))


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, "creating the directory", path, None) from e


def _check_replaceable(final: Path) -> None:
    if final.exists() and not (_layout.is_complete(final) or (final.is_dir() and not any(final.iterdir()))):
        raise CheckpointError(
            f"save_state({str(final)!r}): that path exists and is not a distrib checkpoint; save_state "
            "replaces only an earlier checkpoint or an empty directory. Choose a new directory."
        )


def commit(
    runtime: Runtime, plan: Plan, writer: CheckpointWriter, metadata: dict[str, Any], group: Any = None
) -> None:
    """Steps 2 (the writes still pending) to 4, on every rank; the temporary directory goes on failure."""
    try:
        parts = run_on_every_rank(runtime, "writing the checkpoint", writer.finish, group)
        _faults.point("after_write", runtime.rank)
        run_on_every_rank(
            runtime, "writing the manifest", lambda: _write_manifest(runtime, plan, parts, metadata), group
        )
        _faults.point("after_manifest", runtime.rank)
        run_on_every_rank(runtime, "publishing the checkpoint", lambda: _publish(runtime, plan), group)
    except BaseException:
        discard_temp(runtime, plan)
        raise


def discard_temp(runtime: Runtime, plan: Plan) -> None:
    if runtime.rank == 0 and plan.temp.exists():
        shutil.rmtree(plan.temp, ignore_errors=True)


def _write_manifest(
    runtime: Runtime, plan: Plan, parts: list[dict[str, Any]], metadata: dict[str, Any]
) -> None:
    if runtime.rank != 0:
        return
    recorded = {name: entry for part in parts for name, entry in part.items()}
    unrecorded = [name for name in list_files(plan.temp) if name not in recorded]
    files = {**recorded, **describe_unrecorded(plan.temp, unrecorded)}
    missing = sorted(name for name in recorded if not (plan.temp / name).is_file())
    if missing:
        raise CheckpointError(
            f"the checkpoint {str(plan.final)!r} lost files while it was written ({', '.join(missing[:5])}); "
            "is the temporary directory shared with another job? Save again."
        )
    write_manifest(plan.temp, build(metadata, files, plan.save_counter))
    try:
        fsync_dir(plan.temp)
    except OSError as e:
        raise os_error(e, "syncing", plan.temp, plan.final) from e


def _publish(runtime: Runtime, plan: Plan) -> None:
    """On rank 0: put the finished checkpoint in place, then rotate old checkpoints."""
    if runtime.rank != 0:
        return
    try:
        _layout.replace(plan.temp, plan.final)
    except OSError as e:
        raise os_error(e, "putting in place", plan.final, plan.final) from e
    _faults.point("after_publish")
    limit = runtime.settings.total_limit
    if plan.rotate_root is not None and limit is not None:
        _layout.rotate(plan.rotate_root, limit, keep=plan.final)
