"""`init_trackers`, `log`, `end_training` and `get_tracker`: experiment tracking on the main process.

Every rank calls these functions; only the main process starts trackers and writes. Checks that can fail
(unknown tracker names, missing packages, reserved keys) run on every rank, so all ranks fail alike
instead of one rank failing while the others wait for it. The trackers of a run belong to its scope.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsInt

from .._runtime import Runtime, current
from ..errors import DistribWarning, missing_extra
from ._base import NullTracker, Tracker, config_dict, to_python
from ._hosted import CometTracker, MLflowTracker, WandBTracker, _Resumable, is_installed
from ._jsonl import RESERVED_KEYS, JSONLTracker
from ._tensorboard import TensorBoardTracker

TrackerSpec = str | Tracker


@dataclass(frozen=True)
class _Builtin:
    factory: Callable[..., Tracker]
    module: str | None  # the package it needs, None when it needs none
    extra: str
    takes_logging_dir: bool


#: tracker name -> how to build it. "all" means every one whose package is installed.
BUILTIN_TRACKERS: dict[str, _Builtin] = {
    "jsonl": _Builtin(JSONLTracker, None, "", takes_logging_dir=True),
    "tensorboard": _Builtin(TensorBoardTracker, "tensorboard", "tensorboard", takes_logging_dir=True),
    "wandb": _Builtin(WandBTracker, "wandb", "wandb", takes_logging_dir=False),
    "mlflow": _Builtin(MLflowTracker, "mlflow", "mlflow", takes_logging_dir=False),
    "comet": _Builtin(CometTracker, "comet_ml", "comet", takes_logging_dir=False),
}


@dataclass
class _Session:
    project_name: str
    names: tuple[str, ...]  # on every rank, so lookups fail alike everywhere
    trackers: dict[str, Tracker] = field(default_factory=dict)  # on the main process only


_KEY = "tracking"  # this feature's slot in the run's TrainingState.extensions


def init_trackers(
    project_name: str,
    config: Any = None,
    trackers: TrackerSpec | Sequence[TrackerSpec] = "jsonl",
    *,
    logging_dir: str | os.PathLike[str] | None = None,
    init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Start experiment trackers on the main process and record the hyper-parameters in `config`.

    `trackers` takes names ("jsonl", "tensorboard", "wandb", "mlflow", "comet", or "all" for every one
    installed), tracker objects (see `Tracker`), or a list of both. Files go to
    `<logging_dir>/<project_name>/`; `logging_dir` defaults to `Settings.project_dir`, else "runs".
    `init_kwargs` passes keywords to a built-in tracker by name, e.g. `{"wandb": {"entity": "me"}}`.
    `config` may be a dict, a dataclass or an `argparse.Namespace`. Call it on every rank. Example::

        with distributed(project_dir="out"):
            init_trackers("mnist", config={"lr": 1e-3, "batch_size": 64}, trackers=["jsonl", "tensorboard"])
            for step, batch in enumerate(loader):
                ...
                log({"loss": loss}, step=step)
            end_training()
    """
    runtime = current("init_trackers")
    if not isinstance(project_name, str) or not project_name or Path(project_name).is_absolute():
        raise ValueError(f"init_trackers(project_name={project_name!r}) needs a non-empty relative name.")
    if _KEY in runtime.state.extensions:
        raise ValueError(
            "init_trackers() was already called in this scope; call end_training() first to start new trackers."
        )
    hparams = config_dict(config)
    directory = Path(logging_dir if logging_dir is not None else runtime.settings.project_dir or "runs")
    chosen = _build(_as_list(trackers), directory, dict(init_kwargs or {}))
    session = _Session(project_name, tuple(tracker.name for tracker in chosen))
    if runtime.is_main_process:
        _warn_ignored(init_kwargs or {}, chosen)
        for tracker in chosen:
            if isinstance(tracker, _Resumable):  # hosted trackers keep their run id there
                tracker.resume_dir = directory / project_name
                tracker.resuming = runtime.state.resumed_step is not None
        _start_all(chosen, project_name, hparams)
        session.trackers = {tracker.name: tracker for tracker in chosen}
    runtime.state.extensions[_KEY] = session
    runtime.call_on_close(lambda: _finish(runtime))
    runtime.state.resume_listeners.append(lambda: _rewind(runtime))
    if runtime.state.resumed_step is not None:  # load_state() came first
        _rewind(runtime)


def _as_list(trackers: TrackerSpec | Sequence[TrackerSpec]) -> list[TrackerSpec]:
    if isinstance(trackers, str) or not isinstance(trackers, Sequence):
        return [trackers]
    return list(trackers)


def _expand_all(specs: list[TrackerSpec]) -> list[TrackerSpec]:
    if "all" not in specs:
        return specs
    installed = [name for name, b in BUILTIN_TRACKERS.items() if b.module is None or is_installed(b.module)]
    others = [spec for spec in specs if spec != "all"]
    return [*installed, *(spec for spec in others if spec not in installed)]


def _build(
    specs: list[TrackerSpec], logging_dir: Path, init_kwargs: dict[str, Mapping[str, Any]]
) -> list[Tracker]:
    built: list[Tracker] = []
    for spec in _expand_all(specs):
        tracker = _from_name(spec, logging_dir, init_kwargs) if isinstance(spec, str) else _check_custom(spec)
        if any(tracker.name == other.name for other in built):
            raise ValueError(
                f"init_trackers() got two trackers named {tracker.name!r}; give each a unique name."
            )
        built.append(tracker)
    return built


def _warn_ignored(init_kwargs: Mapping[str, Any], trackers: list[Tracker]) -> None:
    ignored = sorted(set(init_kwargs) - {tracker.name for tracker in trackers})
    if ignored:
        warnings.warn(
            f"init_trackers(init_kwargs=...) has keywords for {', '.join(map(repr, ignored))}, which is not among "
            "the trackers started; they are ignored.",
            DistribWarning,
            stacklevel=3,
        )


def _from_name(name: str, logging_dir: Path, init_kwargs: Mapping[str, Mapping[str, Any]]) -> Tracker:
    builtin = BUILTIN_TRACKERS.get(name)
    if builtin is None:
        known = ", ".join(map(repr, [*BUILTIN_TRACKERS, "all"]))
        raise ValueError(
            f"init_trackers() does not know the tracker {name!r}; use one of {known} or a Tracker object."
        )
    if builtin.module is not None and not is_installed(builtin.module):
        raise missing_extra(builtin.module, builtin.extra, f"The {name!r} tracker")
    kwargs = dict(init_kwargs.get(name, {}))
    if builtin.takes_logging_dir:
        kwargs.setdefault("logging_dir", logging_dir)
    return builtin.factory(**kwargs)


def _check_custom(tracker: Any) -> Tracker:
    if isinstance(tracker, type):
        raise TypeError(
            f"init_trackers() got the class {tracker.__name__}; pass an instance: {tracker.__name__}(...)."
        )
    if not isinstance(tracker, Tracker):
        missing = [attr for attr in ("name", "start", "log", "finish") if not hasattr(tracker, attr)]
        raise TypeError(
            f"init_trackers() got {tracker!r}, which is neither a tracker name nor a tracker: it lacks "
            f"{', '.join(missing)} (see distrib.Tracker)."
        )
    if not isinstance(tracker.name, str) or not tracker.name:
        raise TypeError(f"the tracker {tracker!r} needs a non-empty string `name`.")
    return tracker


def _start_all(trackers: list[Tracker], project_name: str, config: dict[str, Any]) -> None:
    started: list[Tracker] = []
    try:
        for tracker in trackers:
            tracker.start(project_name, config)
            started.append(tracker)
    except BaseException:
        for tracker in reversed(started):
            tracker.finish()
        raise


def _session(runtime: Runtime, caller: str) -> _Session:
    session = runtime.state.extensions.get(_KEY)
    if session is None:
        raise RuntimeError(f"{caller}() needs running trackers; call init_trackers(project_name, ...) first.")
    return session


def log(values: Mapping[str, Any], step: SupportsInt | None = None) -> None:
    """Send `values` to every tracker (main process only); tensors become Python numbers.

    Call it on every rank: other processes return at once. Values are usually numbers; reduce them
    across ranks first (`reduce(loss)`) if every rank's value matters. The names "step" and "wall_time"
    are reserved. Example::

        log({"loss": loss, "lr": scheduler.get_last_lr()[0]}, step=step)
    """
    runtime = current("log")
    session = _session(runtime, "log")
    if not isinstance(values, Mapping):
        raise TypeError(
            f"log() takes a dict of name -> value, got {type(values).__name__}; write log({{'loss': loss}})."
        )
    clash = [key for key in RESERVED_KEYS if key in values]
    if clash:
        raise ValueError(
            f"log() values may not use the reserved name(s) {clash}; pass the step as log(values, step=...)."
        )
    if not runtime.is_main_process:
        return
    plain = to_python(values)
    at = None if step is None else int(step)
    for tracker in session.trackers.values():
        if hasattr(tracker, "optimizer_step"):
            tracker.optimizer_step = runtime.state.optimizer_steps
        tracker.log(plain, at)


def _rewind(runtime: Runtime) -> None:
    """After `load_state`: trackers that can drop what the run that died logged after the checkpoint do
    so (JSONL, TensorBoard), so a resumed run never records a step twice."""
    session = runtime.state.extensions.get(_KEY)
    step = runtime.state.resumed_step
    if session is None or step is None:
        return
    for tracker in session.trackers.values():
        rewind = getattr(tracker, "rewind", None)
        if callable(rewind):
            rewind(step)


def end_training() -> None:
    """Finish every tracker (flush and close files, end hosted runs). Call it on every rank at the end.

    Safe to call when no tracker runs. After it, `init_trackers` may start new ones. Example::

        init_trackers("mnist")
        ...
        end_training()
    """
    _finish(current("end_training"))


def _finish(runtime: Runtime) -> None:
    """Finish the run's trackers; also called when its scope closes without end_training()."""
    session = runtime.state.extensions.pop(_KEY, None)
    if session is None:
        return
    errors: list[BaseException] = []
    for tracker in session.trackers.values():
        try:
            tracker.finish()
        except Exception as error:  # finish the others before reporting
            errors.append(error)
    if errors:
        raise errors[0]


def get_tracker(name: str, unwrap: bool = False) -> Any:
    """The running tracker called `name`, or with `unwrap=True` the library object it writes through.

    On processes other than the main one it returns a tracker (or writer) whose calls do nothing, so the
    same line can run on every rank. Example::

        writer = get_tracker("tensorboard", unwrap=True)   # a torch SummaryWriter
        writer.add_histogram("fc.weight", model.fc.weight, step)
    """
    runtime = current("get_tracker")
    session = _session(runtime, "get_tracker")
    if name not in session.names:
        raise ValueError(
            f"no tracker named {name!r} is running; running: {', '.join(session.names) or 'none'}."
        )
    tracker: Any = session.trackers[name] if runtime.is_main_process else NullTracker(name)
    return getattr(tracker, "writer", tracker) if unwrap else tracker
