"""Trackers for hosted services: Weights & Biases, MLflow and Comet, each used only when installed.

The service's package is imported when the tracker starts (on the main process), never at import time.
Each remembers its run's id in `<logging_dir>/<project_name>/<tracker>_run_id`; a run resumed with
`load_state` before `init_trackers` continues that same hosted run instead of starting a new one.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import DistribWarning, missing_extra
from ._base import flatten, is_number

#: MLflow refuses longer parameter values in old versions; longer ones are cut.
MLFLOW_MAX_PARAM_LENGTH = 500
#: MLflow accepts at most this many parameters in one call.
MLFLOW_PARAMS_PER_CALL = 100


def is_installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, tracker: str) -> Any:
    """Import a tracker's package, or raise the error that names `pip install 'distrib[<extra>]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(module, extra, f"The {tracker!r} tracker") from None


class _Resumable:
    """Set by `init_trackers` before `start`: where the run id is kept, and whether this run resumed."""

    resume_dir: Path | None = None
    resuming: bool = False

    def _saved_run_id(self, name: str) -> str | None:
        path = self.resume_dir / f"{name}_run_id" if self.resume_dir is not None else None
        if not self.resuming or path is None or not path.is_file():
            return None
        return path.read_text(encoding="utf-8").strip() or None

    def _remember_run_id(self, name: str, run_id: Any) -> None:
        if self.resume_dir is not None and isinstance(run_id, str) and run_id:
            self.resume_dir.mkdir(parents=True, exist_ok=True)
            (self.resume_dir / f"{name}_run_id").write_text(run_id + "\n", encoding="utf-8")


def numbers_only(values: Mapping[str, Any], tracker: str, skipped: set[str]) -> dict[str, float]:
    """The numeric entries of `values` (nested dicts flattened); warn once per key for the rest."""
    numbers: dict[str, float] = {}
    for key, value in flatten(values).items():
        if is_number(value):
            numbers[key] = float(value)
        elif key not in skipped:
            skipped.add(key)
            warnings.warn(
                f"the {tracker} tracker skips {key!r}: it logs numbers only, not {type(value).__name__}; "
                f"use get_tracker({tracker!r}, unwrap=True) for other kinds.",
                DistribWarning,
                stacklevel=4,
            )
    return numbers


class WandBTracker(_Resumable):
    """Log to Weights & Biases (`pip install 'distrib[wandb]'`). `writer` is the `wandb` run.

    Keywords go to `wandb.init` (e.g. `entity=`, `name=`, `mode="offline"`). Example::

        init_trackers("mnist", config={"lr": 1e-3}, trackers="wandb", init_kwargs={"wandb": {"entity": "me"}})
    """

    name = "wandb"

    def __init__(self, **init_kwargs: Any) -> None:
        self.init_kwargs = init_kwargs
        self.writer: Any = None

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        wandb = require("wandb", "wandb", self.name)
        kwargs = dict(self.init_kwargs)
        saved = self._saved_run_id(self.name)
        if saved is not None and "id" not in kwargs:
            kwargs.update(id=saved, resume="allow")
        self.writer = wandb.init(project=project_name, config=config, **kwargs)
        self._remember_run_id(self.name, getattr(self.writer, "id", None))

    def log(self, values: dict[str, Any], step: int | None) -> None:
        self.writer.log(values, step=step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.finish()
            self.writer = None


class MLflowTracker(_Resumable):
    """Log to MLflow (`pip install 'distrib[mlflow]'`): the project is the experiment, config the params.

    Keywords go to `mlflow.start_run` (e.g. `run_name=`). `writer` is the active run. Example::

        init_trackers("mnist", config={"lr": 1e-3}, trackers="mlflow")
    """

    name = "mlflow"

    def __init__(self, **run_kwargs: Any) -> None:
        self.run_kwargs = run_kwargs
        self.writer: Any = None
        self._mlflow: Any = None
        self._skipped: set[str] = set()

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        mlflow = self._mlflow = require("mlflow", "mlflow", self.name)
        mlflow.set_experiment(project_name)
        kwargs = dict(self.run_kwargs)
        saved = self._saved_run_id(self.name)
        if saved is not None and "run_id" not in kwargs:
            kwargs["run_id"] = saved
        self.writer = mlflow.start_run(**kwargs)
        self._remember_run_id(self.name, getattr(getattr(self.writer, "info", None), "run_id", None))
        params = [(key, str(value)[:MLFLOW_MAX_PARAM_LENGTH]) for key, value in flatten(config).items()]
        for first in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
            mlflow.log_params(dict(params[first : first + MLFLOW_PARAMS_PER_CALL]))

    def log(self, values: dict[str, Any], step: int | None) -> None:
        self._mlflow.log_metrics(numbers_only(values, self.name, self._skipped), step=step)

    def finish(self) -> None:
        if self.writer is not None:
            self._mlflow.end_run()
            self.writer = None


class CometTracker(_Resumable):
    """Log to Comet (`pip install 'distrib[comet]'`). `writer` is the `comet_ml.Experiment`.

    Keywords go to `comet_ml.Experiment` (e.g. `workspace=`). Example::

        init_trackers("mnist", config={"lr": 1e-3}, trackers="comet")
    """

    name = "comet"

    def __init__(self, **experiment_kwargs: Any) -> None:
        self.experiment_kwargs = experiment_kwargs
        self.writer: Any = None
        self._skipped: set[str] = set()

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        comet_ml = require("comet_ml", "comet", self.name)
        saved = self._saved_run_id(self.name)
        if saved is not None:
            self.writer = comet_ml.ExistingExperiment(previous_experiment=saved, **self.experiment_kwargs)
        else:
            self.writer = comet_ml.Experiment(project_name=project_name, **self.experiment_kwargs)
        key = getattr(self.writer, "get_key", None)
        self._remember_run_id(self.name, key() if callable(key) else None)
        if config:
            self.writer.log_parameters(flatten(config))

    def log(self, values: dict[str, Any], step: int | None) -> None:
        self.writer.log_metrics(numbers_only(values, self.name, self._skipped), step=step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.end()
            self.writer = None
