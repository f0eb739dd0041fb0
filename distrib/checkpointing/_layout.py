"""Where checkpoints live: the project layout, the newest complete checkpoint, replacement, rotation.

With the `project_dir` setting, checkpoints are `<project_dir>/checkpoints/step_<optimizer_steps:06d>`
(`step_000120_1`, `_2`, ... when a step is saved again). A checkpoint is complete when its directory
has its final name and a valid `manifest.json`: it is written under a hidden temporary name
(`.tmp-step_000120-<random>`) and renamed only after every file is on disk. "Newest" means the highest
save counter in the manifest (the order checkpoints were written in), not the highest step.

Replacing an explicit path that holds a checkpoint swaps the new one in with one atomic exchange
(`renameat2(RENAME_EXCHANGE)` on Linux), so a complete checkpoint is at the path at every moment. Where the
filesystem cannot exchange, the old one is first renamed to `.old-<name>-<random>`; a crash before the
new one is in place is repaired by the next `save_state` or `load_state` of that path, which puts the
newest complete copy back. Cleanup never deletes the only complete copy. Directories on their way out are
renamed to `.trash-...` before they are deleted, so a crash never leaves a half-deleted checkpoint under
a name that looks complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import warnings
from pathlib import Path

from ..errors import DistribWarning
from . import _faults
from ._files import fsync_dir, temp_sibling
from ._manifest import MANIFEST, peek_counter

CHECKPOINTS_DIR = "checkpoints"
TEMP_PREFIX = ".tmp"
TRASH_PREFIX = ".trash"
OLD_PREFIX = ".old"
_NAME = re.compile(r"step_(\d+)(?:-micro_\d+)?(?:_(\d+))?")
#: whether to try the atomic exchange of directories (tests turn it off to check the fallback)
USE_EXCHANGE = True


def checkpoints_root(project_dir: str | os.PathLike[str]) -> Path:
    """`<project_dir>/checkpoints`."""
    return Path(project_dir) / CHECKPOINTS_DIR


def is_complete(path: Path) -> bool:
    """A checkpoint directory that finished saving (it has its manifest)."""
    return (path / MANIFEST).is_file()


def _step_order(path: Path) -> tuple[int, int] | None:
    match = _NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step_*` checkpoints under `root`, oldest first: by save counter, then (for checkpoints
    written before save counters existed, which count as older) by step and repeat suffix. A checkpoint
    whose manifest cannot be read is left out, with a warning naming it."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = _step_order(path)
        if step is None or not is_complete(path):
            continue
        counter = peek_counter(path)
        if counter is None:
            warnings.warn(
                f"ignoring the checkpoint {str(path)!r}: its manifest is damaged (load_state({str(path)!r}) "
                "says why). Delete or restore it.",
                DistribWarning,
                stacklevel=3,
            )
            continue
        found.append(((counter, *step), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (the one saved last), or None. Example::

    latest_checkpoint(Path("runs/exp1/checkpoints"))   # Path('runs/exp1/checkpoints/step_000300')
    """
    found = complete_checkpoints(root)
    return found[-1] if found else None


def next_counter(root: Path) -> int:
    """One more than the highest save counter of the checkpoints in `root` (0 for the first)."""
    counters = [peek_counter(p) for p in root.iterdir() if is_complete(p)] if root.is_dir() else []
    return max((c for c in counters if c is not None), default=-1) + 1


def new_checkpoint_path(root: Path, step: int, micro_step: int = 0) -> Path:
    """`root/step_<step:06d>`, or `step_<step:06d>-micro_<k>` for a checkpoint taken after micro-batch k of
    an accumulation window that has not closed yet; with a `_<n>` suffix when that name is taken."""
    base = f"step_{step:06d}" + (f"-micro_{micro_step}" if micro_step else "")
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not USE_EXCHANGE or not hasattr(os, "sched_getaffinity"):  # Linux only
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace(temp: Path, final: Path) -> None:
    """Put the complete checkpoint `temp` at `final`, which may hold an earlier one, so that a complete
    checkpoint is at `final` (or, without exchange, recoverable next to it) at every moment."""
    if not final.exists():
        os.replace(temp, final)
        fsync_dir(final.parent)
        return
    if _exchange(temp, final):
        fsync_dir(final.parent)
        _faults.point("after_exchange")
        discard(temp)  # the earlier checkpoint, now under the temporary name
        return
    old = temp_sibling(final, OLD_PREFIX)
    os.replace(final, old)
    fsync_dir(final.parent)
    _faults.point("after_move_aside")
    os.replace(temp, final)
    fsync_dir(final.parent)
    discard(old)


def _siblings(final: Path, prefixes: tuple[str, ...]) -> list[Path]:
    if not final.parent.is_dir():
        return []
    starts = tuple(f"{prefix}-{final.name}-" for prefix in prefixes)
    return [p for p in final.parent.iterdir() if p.name.startswith(starts) and p.is_dir()]


def recover(final: Path) -> bool:
    """If an interrupted replacement left `final` without a checkpoint, put the newest complete copy
    (the new one if it was complete, else the old one) back in place. True if it did."""
    if is_complete(final) or (final.exists() and not _is_empty_dir(final)):
        return False
    copies = [
        (c, p) for p in _siblings(final, (TEMP_PREFIX, OLD_PREFIX)) if (c := peek_counter(p)) is not None
    ]
    if not copies:
        return False
    best = max(copies, key=lambda cp: cp[0])[1]
    if final.exists():
        final.rmdir()
    os.replace(best, final)
    fsync_dir(final.parent)
    return True


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def rotate(root: Path, total_limit: int, keep: Path) -> list[Path]:
    """Delete the oldest complete checkpoints (by save counter) so that `total_limit` remain; never
    `keep` (the one just saved), never one that is incomplete or unreadable. Returns what was deleted."""
    found = [p for p in complete_checkpoints(root) if p != keep]
    excess = len(found) + 1 - total_limit
    victims = found[: max(0, excess)]
    for path in victims:
        trash = move_to_trash(path)
        _faults.point("during_rotate")
        shutil.rmtree(trash, ignore_errors=True)
    return victims


_LEFTOVER = re.compile(r"\.(tmp|trash|old)-(.+)-[^-]+")


def remove_leftovers(parent: Path, name: str | None = None) -> None:
    """Remove hidden temporary, old and trash directories left in `parent` by interrupted saves.

    With `name`, those of that one checkpoint, and only once a complete checkpoint is back at that name
    (see `recover`). Without, those of project checkpoints (`step_*`: an unpublished save that never
    returned); leftovers of an explicit path in the same folder wait for that path's own save or load."""
    if not parent.is_dir():
        return
    if name is not None:
        recover(parent / name)
        if not is_complete(parent / name):
            return  # keep every copy until a complete checkpoint is in place
    for path in parent.iterdir():
        match = _LEFTOVER.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        owner = match.group(2)
        if (owner == name) if name is not None else _NAME.fullmatch(owner) is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(path)
