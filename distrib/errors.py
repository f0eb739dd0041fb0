"""Exceptions and warnings raised by distrib.

Every error says what was wrong and what to do instead. The tree::

    DistribError                      base of everything distrib raises on purpose
    ├── NoScopeError (RuntimeError)   a free function was called outside `distributed(...)`
    ├── SettingsError (ValueError)    an invalid setting, config-file key or launcher variable
    ├── PrepareError (TypeError)      `prepare()` got something it cannot prepare
    ├── TrainingError (ValueError)    a training call was misused (e.g. backward on a non-scalar)
    ├── PrecisionError (ValueError)   the device cannot run the requested mixed precision
    ├── DataError (RuntimeError)      a prepared DataLoader cannot deliver the data asked for (ranks drew
    │                                 different orders, a call conflicts with the resumed position)
    ├── CollectiveError (RuntimeError) a collective was given inputs the ranks disagree on
    │   └── CollectiveMismatchError    ranks called different collectives (op, shapes, call site) or one left
    ├── MissingExtraError (ImportError) an optional dependency is not installed
    ├── CheckpointError (RuntimeError) a checkpoint cannot be written or read
    │   ├── CheckpointCorruptError     a file is missing, truncated or fails its checksum
    │   ├── CheckpointMismatchError    the checkpoint does not fit this run (objects, keys, world size)
    │   └── ResumeMismatchError        a resumed run would not continue where the saved one stopped
    ├── ReplicaDivergenceError (RuntimeError) ranks' copies of replicated state differ
    ├── LaunchError (RuntimeError)    the launcher could not start or keep the workers
    └── DeviceMapError (ValueError)   a device map or memory budget is invalid

    DistribWarning (UserWarning)      a setting was ignored or overridden
"""

from __future__ import annotations


class DistribError(Exception):
    """Base class of every error distrib raises on purpose."""


class NoScopeError(DistribError, RuntimeError):
    """A free function needs a runtime, but no `distributed(...)` scope is open in this thread."""


class SettingsError(DistribError, ValueError):
    """A setting has an invalid value, or two sources of settings disagree."""


class PrepareError(DistribError, TypeError):
    """`prepare()` was given an object it cannot prepare, or in an order it cannot handle."""


class TrainingError(DistribError, ValueError):
    """A training function was called with arguments it cannot use."""


class PrecisionError(DistribError, ValueError):
    """The requested mixed precision cannot run on this device or setup."""


class DataError(DistribError, RuntimeError):
    """A prepared DataLoader cannot deliver the data the run asks for: the ranks drew different sample
    orders, or a call (`set_epoch`, `skip_first_batches`) conflicts with the position `load_state` restored."""


class CollectiveError(DistribError, RuntimeError):
    """The inputs of a collective do not agree across ranks (shapes, dtypes, structure)."""


class CollectiveMismatchError(CollectiveError):
    """Ranks reached different collectives (op, shapes, dtypes or call site), or one rank left the run.

    Raised on every rank before the mismatched collective runs; the message is a table of each rank's op
    and call site."""


class MissingExtraError(DistribError, ImportError):
    """An optional dependency is missing; the message names the `pip install` that adds it."""


class CheckpointError(DistribError, RuntimeError):
    """A checkpoint could not be written, found, verified or loaded."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated or does not match the checksum in its manifest."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the run loading it (number of objects, model keys, world size)."""


class ResumeMismatchError(CheckpointError):
    """After `load_state`, the run does not continue where the saved run would have: the next batch, the
    learning rates, the optimizer step or the random state differ from what was recorded at save time."""


class ReplicaDivergenceError(DistribError, RuntimeError):
    """State that every rank should hold identically (replicated parameters, step counts, learning rates,
    the loss scale) differs between ranks; the message names the first tensor, the ranks and the step."""


class LaunchError(DistribError, RuntimeError):
    """The launcher could not start the workers or a worker failed."""


class DeviceMapError(DistribError, ValueError):
    """A device map, a memory budget or an offload request is invalid."""


class DistribWarning(UserWarning):
    """A setting was ignored or overridden; the message says which and why."""


def missing_extra(package: str, extra: str, purpose: str) -> MissingExtraError:
    """Build the error for a missing optional dependency, naming the install command."""
    return MissingExtraError(
        f"{purpose} needs the '{package}' package, which is not installed. "
        f"Install it with: pip install 'distrib[{extra}]'"
    )
