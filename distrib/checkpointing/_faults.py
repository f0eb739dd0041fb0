"""Named fault points inside `save_state`, for crash tests.

A test sets the environment variable `DISTRIB_CHECKPOINT_FAULT` to one of `POINTS` (optionally
`name@rank` to pick one rank) and the process kills itself with SIGKILL when the save reaches that point,
as a power cut or an OOM kill would. Unset (always, outside tests), `point()` is one dictionary lookup.
This is a testing hook, not a setting: it is read once, here, and nowhere else.
"""

from __future__ import annotations

import os
import signal

#: every instrumented moment of a save, in the order a save passes them
POINTS = (
    "after_plan",  # the temporary directory exists, nothing written
    "during_write",  # a file is partly written
    "after_write",  # every rank wrote its files, no manifest yet
    "after_manifest",  # the manifest is written, the checkpoint not yet in place
    "after_exchange",  # an explicit path: the new checkpoint swapped in, the old one not yet removed
    "after_move_aside",  # an explicit path without atomic exchange: the old checkpoint moved aside
    "after_publish",  # the checkpoint is in place, older ones not yet rotated
    "during_rotate",  # one old checkpoint moved to the trash, not yet deleted
    "background_write",  # a background save is writing (the call already returned)
)

_ENV = "DISTRIB_CHECKPOINT_FAULT"
_armed: tuple[str, int | None] | None = None
_read = False


def _target() -> tuple[str, int | None] | None:
    global _armed, _read
    if not _read:
        _read = True
        value = os.environ.get(_ENV, "")
        if value:
            name, _, rank = value.partition("@")
            if name not in POINTS:
                raise ValueError(f"{_ENV}={value!r}: {name!r} is not one of {', '.join(POINTS)}.")
            _armed = (name, int(rank) if rank else None)
    return _armed


def point(name: str, rank: int | None = None) -> None:
    """Kill this process here if the test armed `name` (for this rank)."""
    target = _target()
    if target is None or target[0] != name:
        return
    if target[1] is not None and rank is not None and target[1] != rank:
        return
    os.kill(os.getpid(), signal.SIGKILL)
