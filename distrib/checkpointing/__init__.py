"""Checkpoints that never lose a run: `save_state` / `load_state`, `save_model`, `save`, and extensions.

A checkpoint is a directory (layout in `_layout.py`, files in `_objects.py`, `_rng.py` and the strategy's
`save_training_state`) whose `manifest.json`, written last, lists every file with its size and CRC-32C
checksum, computed while the file was written (`_io.py`). It is written under a temporary name and put in
place once complete (`_commit.py`), so a crash during a save never damages earlier checkpoints, and
`load_state` reads only listed files, each checked while it is read (`_reader.py`). Background saves
(`_background.py`) snapshot the state and run the same protocol in a thread.
"""

from __future__ import annotations

from ._background import SaveHandle
from ._hooks import (
    HookHandle,
    register_for_checkpointing,
    register_load_state_pre_hook,
    register_save_state_pre_hook,
)
from ._layout import latest_checkpoint
from ._model import get_state_dict, save, save_model
from ._state import load_state, save_state

__all__ = [
    "HookHandle",
    "SaveHandle",
    "get_state_dict",
    "latest_checkpoint",
    "load_state",
    "register_for_checkpointing",
    "register_load_state_pre_hook",
    "register_save_state_pre_hook",
    "save",
    "save_model",
    "save_state",
]
