"""Experiment tracking: built-in trackers, the `Tracker` interface and the free functions that drive them."""

from ._api import BUILTIN_TRACKERS, end_training, get_tracker, init_trackers, log
from ._base import NullTracker, Tracker, to_python
from ._hosted import CometTracker, MLflowTracker, WandBTracker
from ._jsonl import JSONLTracker
from ._tensorboard import TensorBoardTracker

__all__ = [
    "BUILTIN_TRACKERS",
    "CometTracker",
    "JSONLTracker",
    "MLflowTracker",
    "NullTracker",
    "TensorBoardTracker",
    "Tracker",
    "WandBTracker",
    "end_training",
    "get_tracker",
    "init_trackers",
    "log",
    "to_python",
]
