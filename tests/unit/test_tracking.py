"""Experiment tracking in one process: the JSON-lines file, TensorBoard, hosted trackers, custom trackers.

Ranks other than 0 are simulated by pushing a runtime with that rank (no process group is needed, since
tracking itself never communicates); tests/test_tracking_multiprocess.py checks the same on real ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import distrib
from distrib import _runtime
from distrib._runtime import Runtime
from distrib.errors import DistribWarning, MissingExtraError, NoScopeError
from tests._support.runtime import fake_runtime


@contextlib.contextmanager
def as_rank(rank: int, world_size: int = 2, **settings: Any) -> Iterator[Runtime]:
    """A runtime at `rank` on the thread-local stack, as a rank of a `world_size`-process job."""
    runtime = fake_runtime(rank, world_size, **settings)
    _runtime.push(runtime)
    try:
        yield runtime
    finally:
        distrib.end_training()
        _runtime.pop(runtime)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class RecordingTracker:
    """A custom tracker that only records what distrib asks of it."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def start(self, project_name: str, config: dict[str, Any]) -> None:
        self.calls.append(("start", project_name, config))

    def log(self, values: dict[str, Any], step: int | None) -> None:
        self.calls.append(("log", values, step))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_jsonl_records_config_and_one_line_per_log(tmp_path: Path) -> None:
    with distrib.distributed():
        distrib.init_trackers("exp", config={"lr": 0.1, "layers": [2, 3]}, logging_dir=tmp_path)
        distrib.log({"loss": torch.tensor(0.5), "acc": 0.25}, step=1)
        distrib.log({"loss": torch.tensor([1.5]), "note": "warm"}, step=2)
        distrib.log({"nested": {"a": torch.tensor(3)}})
        distrib.end_training()
    run = tmp_path / "exp"
    assert json.loads((run / "config.json").read_text()) == {"lr": 0.1, "layers": [2, 3]}
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, None]
    assert records[0]["loss"] == 0.5 and records[0]["acc"] == 0.25
    assert records[1]["loss"] == 1.5 and records[1]["note"] == "warm"
    assert records[2]["nested"] == {"a": 3}
    assert all(isinstance(r["wall_time"], float) for r in records)
    assert records[0]["wall_time"] <= records[1]["wall_time"] <= records[2]["wall_time"]


def test_jsonl_is_flushed_at_each_log_and_appends_across_runs(tmp_path: Path) -> None:
    with as_rank(0, world_size=1):
        distrib.init_trackers("exp", logging_dir=tmp_path)
        distrib.log({"loss": 1.0}, step=0)
        assert len(read_jsonl(tmp_path / "exp" / "metrics.jsonl")) == 1  # readable before end_training
        distrib.end_training()
        distrib.init_trackers("exp", logging_dir=tmp_path)
        distrib.log({"loss": 0.5}, step=1)
    assert [r["loss"] for r in read_jsonl(tmp_path / "exp" / "metrics.jsonl")] == [1.0, 0.5]


def test_logging_dir_defaults_to_project_dir_then_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with as_rank(0, world_size=1, project_dir=str(tmp_path / "proj")):
        distrib.init_trackers("exp")
    assert (tmp_path / "proj" / "exp" / "metrics.jsonl").exists()
    monkeypatch.chdir(tmp_path)
    with as_rank(0, world_size=1):
        distrib.init_trackers("exp2")
    assert (tmp_path / "runs" / "exp2" / "config.json").exists()


def test_config_may_be_a_namespace_or_dataclass(tmp_path: Path) -> None:
    tracker = RecordingTracker()
    with as_rank(0, world_size=1):
        distrib.init_trackers(
            "exp", config=argparse.Namespace(lr=0.1, seed=torch.tensor(3)), trackers=tracker
        )
    assert tracker.calls[0] == ("start", "exp", {"lr": 0.1, "seed": 3})
    with (
        as_rank(0, world_size=1),
        pytest.raises(TypeError, match=r"dict, a dataclass or an argparse\.Namespace"),
    ):
        distrib.init_trackers("exp", config=[("lr", 0.1)], trackers=RecordingTracker())


def test_custom_tracker_receives_start_log_finish_with_plain_values(tmp_path: Path) -> None:
    tracker = RecordingTracker()
    with as_rank(0, world_size=1):
        distrib.init_trackers("exp", config={"lr": 0.1}, trackers=["jsonl", tracker], logging_dir=tmp_path)
        distrib.log({"loss": torch.tensor(2.0), "grid": torch.ones(2, 2)}, step=torch.tensor(7))
        assert distrib.get_tracker("recorder") is tracker
        distrib.end_training()
    assert tracker.calls == [
        ("start", "exp", {"lr": 0.1}),
        ("log", {"loss": 2.0, "grid": [[1.0, 1.0], [1.0, 1.0]]}, 7),
        ("finish",),
    ]
    assert type(tracker.calls[1][1]["loss"]) is float and type(tracker.calls[1][2]) is int
    assert (tmp_path / "exp" / "metrics.jsonl").exists()


def test_non_main_rank_starts_nothing_and_writes_nothing(tmp_path: Path) -> None:
    tracker = RecordingTracker()
    with as_rank(1):
        distrib.init_trackers("exp", config={"lr": 0.1}, trackers=["jsonl", tracker], logging_dir=tmp_path)
        distrib.log({"loss": 1.0}, step=0)
        writer = distrib.get_tracker("jsonl", unwrap=True)
        writer.write("anything")  # does nothing off the main process
        assert isinstance(distrib.get_tracker("recorder"), distrib._tracking.NullTracker)
        with pytest.raises(ValueError, match="no tracker named 'tensorboard'"):
            distrib.get_tracker("tensorboard")
    assert tracker.calls == []
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_get_tracker_unwraps_to_the_writer(tmp_path: Path) -> None:
    with as_rank(0, world_size=1):
        distrib.init_trackers("exp", logging_dir=tmp_path)
        jsonl = distrib.get_tracker("jsonl")
        assert isinstance(jsonl, distrib.JSONLTracker)
        assert distrib.get_tracker("jsonl", unwrap=True) is jsonl.writer
        assert jsonl.metrics_path == tmp_path / "exp" / "metrics.jsonl"


def test_misuse_gives_errors_that_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(NoScopeError, match="init_trackers"):
        distrib.init_trackers("exp")
    with as_rank(0, world_size=1):
        with pytest.raises(RuntimeError, match=r"call init_trackers\(project_name"):
            distrib.log({"loss": 1.0})
        with pytest.raises(ValueError, match="does not know the tracker 'tensorbord'"):
            distrib.init_trackers("exp", trackers="tensorbord", logging_dir=tmp_path)
        with pytest.raises(TypeError, match="pass an instance"):
            distrib.init_trackers("exp", trackers=[RecordingTracker], logging_dir=tmp_path)  # type: ignore[list-item]
        with pytest.raises(TypeError, match="lacks name, start, log, finish"):
            distrib.init_trackers("exp", trackers=[object()], logging_dir=tmp_path)  # type: ignore[list-item]
        with pytest.raises(ValueError, match="two trackers named 'recorder'"):
            distrib.init_trackers(
                "exp", trackers=[RecordingTracker(), RecordingTracker()], logging_dir=tmp_path
            )
        distrib.init_trackers("exp", logging_dir=tmp_path)
        with pytest.raises(ValueError, match="already called"):
            distrib.init_trackers("exp", logging_dir=tmp_path)
        with pytest.raises(ValueError, match="reserved"):
            distrib.log({"step": 3})
        with pytest.raises(TypeError, match="dict of name -> value"):
            distrib.log(0.5)  # type: ignore[arg-type]


def test_reserved_names_are_refused_on_every_rank(tmp_path: Path) -> None:
    with as_rank(1):
        distrib.init_trackers("exp", logging_dir=tmp_path)
        with pytest.raises(ValueError, match="reserved"):
            distrib.log({"wall_time": 3.0})


def test_missing_wandb_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails, installed or not
    for rank in (0, 1):  # every rank fails alike
        with as_rank(rank), pytest.raises(MissingExtraError, match=r"pip install 'distrib\[wandb\]'"):
            distrib.init_trackers("exp", trackers=["jsonl", "wandb"], logging_dir=tmp_path)
    assert not (tmp_path / "exp").exists()


def test_missing_tensorboard_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with (
        as_rank(0, world_size=1),
        pytest.raises(MissingExtraError, match=r"pip install 'distrib\[tensorboard\]'"),
    ):
        distrib.init_trackers("exp", trackers="tensorboard", logging_dir=tmp_path)


def test_all_means_every_installed_tracker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for module in ("tensorboard", "wandb", "mlflow", "comet_ml"):
        monkeypatch.setitem(sys.modules, module, None)
    with as_rank(1):
        distrib.init_trackers("exp", trackers="all", logging_dir=tmp_path)
        distrib.get_tracker("jsonl")
        with pytest.raises(ValueError, match=r"running: jsonl\.$"):
            distrib.get_tracker("wandb")


def test_init_kwargs_for_a_tracker_not_started_warn(tmp_path: Path) -> None:
    with as_rank(0, world_size=1), pytest.warns(DistribWarning, match="'wandb'"):
        distrib.init_trackers("exp", logging_dir=tmp_path, init_kwargs={"wandb": {"entity": "me"}})


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Any) -> list[tuple[Any, ...]]:
    """Install a stand-in for a tracker's package that records every call made to it."""
    calls: list[tuple[Any, ...]] = []

    def recorder(what: str, result: Any = None) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((what, args, kwargs))
            return result

        return call

    module = types.ModuleType(name)
    for attr, value in attrs.items():
        setattr(module, attr, value(recorder) if callable(value) else value)
    monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_wandb_tracker_drives_a_wandb_run(monkeypatch: pytest.MonkeyPatch) -> None:
    run = types.SimpleNamespace()
    calls = fake_module(monkeypatch, "wandb", init=lambda rec: rec("init", run))
    run.log, run.finish = (lambda *a, **k: calls.append(("log", a, k))), (lambda: calls.append(("finish",)))
    with as_rank(0, world_size=1):
        distrib.init_trackers(
            "exp", config={"lr": 0.1}, trackers="wandb", init_kwargs={"wandb": {"mode": "offline"}}
        )
        distrib.log({"loss": torch.tensor(0.5)}, step=3)
        assert distrib.get_tracker("wandb", unwrap=True) is run
    assert calls == [
        ("init", (), {"project": "exp", "config": {"lr": 0.1}, "mode": "offline"}),
        ("log", ({"loss": 0.5},), {"step": 3}),
        ("finish",),
    ]


def test_mlflow_tracker_records_params_and_numeric_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = {
        "set_experiment": None,
        "start_run": "run",
        "log_params": None,
        "log_metrics": None,
        "end_run": None,
    }
    calls = fake_module(
        monkeypatch, "mlflow", **{k: (lambda rec, k=k, v=v: rec(k, v)) for k, v in recorder.items()}
    )
    config = {f"p{i}": i for i in range(150)} | {"opt": {"name": "adam"}}
    with as_rank(0, world_size=1), pytest.warns(DistribWarning, match="skips 'note'"):
        distrib.init_trackers("exp", config=config, trackers="mlflow")
        distrib.log({"loss": 0.5, "note": "text", "sub": {"acc": 1}}, step=2)
    names = [c[0] for c in calls]
    assert names == ["set_experiment", "start_run", "log_params", "log_params", "log_metrics", "end_run"]
    params = calls[2][1][0] | calls[3][1][0]
    assert len(calls[2][1][0]) == 100 and params["opt/name"] == "adam" and params["p7"] == "7"
    assert calls[4] == ("log_metrics", ({"loss": 0.5, "sub/acc": 1.0},), {"step": 2})


def test_comet_tracker_logs_parameters_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = types.SimpleNamespace()
    calls = fake_module(monkeypatch, "comet_ml", Experiment=lambda rec: rec("Experiment", experiment))
    experiment.log_parameters = lambda params: calls.append(("params", params))
    experiment.log_metrics = lambda values, step: calls.append(("metrics", values, step))
    experiment.end = lambda: calls.append(("end",))
    with as_rank(0, world_size=1):
        distrib.init_trackers("exp", config={"lr": 0.1}, trackers="comet")
        distrib.log({"loss": torch.tensor(0.25)}, step=1)
    assert calls == [
        ("Experiment", (), {"project_name": "exp"}),
        ("params", {"lr": 0.1}),
        ("metrics", {"loss": 0.25}, 1),
        ("end",),
    ]


def test_tensorboard_writes_scalars_text_and_hparams(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with as_rank(0, world_size=1):
        distrib.init_trackers(
            "exp", config={"lr": 0.1, "opt": {"name": "adam"}}, trackers="tensorboard", logging_dir=tmp_path
        )
        distrib.log({"loss": torch.tensor(0.5), "eval": {"acc": 0.75}, "note": "hi"}, step=1)
        distrib.log({"loss": 0.25}, step=2)
        with pytest.warns(DistribWarning, match="skips 'hist'"):
            distrib.log({"hist": torch.ones(3)}, step=2)
        distrib.end_training()
    events = list((tmp_path / "exp").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "exp"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [e.value for e in acc.Scalars("eval/acc")] == [0.75]
    assert "note/text_summary" in acc.Tags()["tensors"]
    hparams = acc.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert b"opt/name" in hparams and b"adam" in hparams
