"""Where checkpoints live: the project layout, the newest complete checkpoint, rotation and cleanup.

With the `project_dir` setting, checkpoints are `<project_dir>/checkpoints/step_<optimizer_steps:06d>`
(`step_000120_1`, `_2`, ... when a step is saved again). A checkpoint is complete when its directory
has its final name and a `manifest.json`: it is written under a hidden temporary name
(`.tmp-step_000120-<random>`) and renamed only after every file is on disk. Directories on their way out
are renamed to `.trash-...` before they are deleted, so a crash never leaves a half-deleted checkpoint
under a name that looks complete. Hidden leftovers are ignored when looking for checkpoints and removed
by the next save.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from ._files import fsync_dir, temp_sibling

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp"
TRASH_PREFIX = ".trash"
_NAME = re.compile(r"step_(\d+)(?:_(\d+))?")


def checkpoints_root(project_dir: str | os.PathLike[str]) -> Path:
    """`<project_dir>/checkpoints`."""
    return Path(project_dir) / CHECKPOINTS_DIR


def is_complete(path: Path) -> bool:
    """A checkpoint directory that finished saving (it has its manifest)."""
    return (path / MANIFEST).is_file()


def _order(path: Path) -> tuple[int, int] | None:
    match = _NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step_*` checkpoints under `root`, oldest first (by step, then by repeat suffix)."""
    if not root.is_dir():
        return []
    found = [(key, p) for p in root.iterdir() if (key := _order(p)) is not None and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Example::

    latest_checkpoint(Path("runs/exp1/checkpoints"))   # Path('runs/exp1/checkpoints/step_000300')
    """
    found = complete_checkpoints(root)
    return found[-1] if found else None


def new_checkpoint_path(root: Path, step: int) -> Path:
    """`root/step_<step:06d>`, with a `_<n>` suffix when that name is taken."""
    base = f"step_{step:06d}"
    path, n = root / base, 0
    while path.exists():
        n += 1
        path = root / f"{base}_{n}"
    return path


def move_to_trash(path: Path) -> Path:
    """Rename a directory to a hidden trash name (atomic; it no longer looks like a checkpoint)."""
    trash = temp_sibling(path, TRASH_PREFIX)
    os.replace(path, trash)
    fsync_dir(path.parent)
    return trash


def discard(path: Path) -> None:
    """Delete a directory safely: rename it to a hidden trash name first, then remove it."""
    shutil.rmtree(move_to_trash(path), ignore_errors=True)


def rotate(root: Path, total_limit: int, keep: Path) -> list[Path]:
    """Delete the oldest complete checkpoints so that `total_limit` remain; never `keep`, never one that
    is incomplete. Returns what was deleted."""
    found = [p for p in complete_checkpoints(root) if p != keep]
    excess = len(found) + 1 - total_limit
    victims = found[: max(0, excess)]
    for path in victims:
        discard(path)
    return victims


def remove_leftovers(parent: Path, name: str | None = None) -> None:
    """Remove hidden temporary and trash directories left in `parent` by interrupted saves (for one
    checkpoint `name` only, when given)."""
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        for prefix in (TEMP_PREFIX, TRASH_PREFIX):
            start = f"{prefix}-{name}-" if name else f"{prefix}-"
            if path.name.startswith(start) and path.is_dir():
                with contextlib.suppress(OSError):
                    shutil.rmtree(path)
