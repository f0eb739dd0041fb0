"""Collectives, triggers and process-control decorators in a one-process run; the straggler analysis;
the settings these features read."""

from __future__ import annotations

import pytest
import torch

import distrib
from distrib import distributed
from distrib._straggler import analyse, format_report
from distrib.errors import CollectiveError, SettingsError, TrainingError


def test_reductions_on_one_process():
    with distributed():
        x = torch.tensor([2.0, -1.0])
        for op in ("sum", "mean", "max", "min", "product"):
            out = distrib.reduce(x, op)
            assert out.tolist() == x.tolist() and out is not x
        assert distrib.reduce(torch.tensor([3]), "mean").dtype == torch.float32
        with pytest.raises(
            CollectiveError,
            match=r"reduce\(reduction='median'\) must be one of 'sum', 'mean', 'max', 'min', 'product'",
        ):
            distrib.reduce(x, "median")  # type: ignore[arg-type]


def test_broadcast_from_a_rank_outside_the_world():
    with distributed():
        assert distrib.broadcast(torch.ones(1), from_process=0).tolist() == [1.0]
        with pytest.raises(
            CollectiveError, match=r"from_process=1\) names a rank outside the run, which has 1 process"
        ):
            distrib.broadcast(torch.ones(1), from_process=1)
        with pytest.raises(CollectiveError, match="needs a rank number"):
            distrib.broadcast(torch.ones(1), from_process="0")  # type: ignore[arg-type]
        with pytest.raises(CollectiveError, match="fills a list in place"):
            distrib.broadcast_object_list(("a",))  # type: ignore[arg-type]


def test_the_trigger_resets_after_each_check():
    with distributed():
        assert distrib.check_trigger() is False
        distrib.set_trigger()
        distrib.set_trigger()
        assert distrib.check_trigger() is True
        assert distrib.check_trigger() is False


def test_on_process_and_on_last_process():
    @distrib.on_process(0)
    def zero():
        return "zero"

    @distrib.on_process(1)
    def one():
        return "one"

    @distrib.on_last_process
    def last():
        return "last"

    with distributed():
        assert zero() == "zero" and last() == "last"
        with pytest.raises(
            TrainingError, match=r"one\(\) is decorated with @on_process\(1\), but the run has 1 process"
        ):
            one()
    assert one.__name__ == "one" and last.__name__ == "last"


def test_on_process_needs_a_rank():
    with pytest.raises(TypeError, match=r"write @on_process\(1\) above f"):

        @distrib.on_process  # type: ignore[arg-type]
        def f():
            pass

    for bad in (-1, 1.5, True):
        with pytest.raises(TypeError, match="needs a rank number"):
            distrib.on_process(bad)  # type: ignore[arg-type]


def test_settings_of_the_checks():
    assert distrib.Settings().stall_timeout == 300.0
    assert distrib.Settings(debug_collectives=True).debug_collectives
    with pytest.raises(SettingsError, match=r"straggler_threshold=0(\.0)? must be > 0"):
        distrib.Settings(straggler_threshold=0)
    with pytest.raises(SettingsError, match="stall_timeout=-1"):
        distrib.Settings(stall_timeout=-1)


# -- the straggler analysis ------------------------------------------------------------------------------


def test_a_rank_slow_in_data_loading_is_flagged_for_data():
    ms = 1e-3
    table = [  # seconds per step: data, compute, comm, total
        [1 * ms, 10 * ms, 14 * ms, 25 * ms],
        [14 * ms, 10 * ms, 1 * ms, 25 * ms],
        [1 * ms, 10 * ms, 14 * ms, 25 * ms],
    ]
    report = analyse(table, threshold=0.2, step=200)
    assert [(f["rank"], f["phase"]) for f in report["flagged"]] == [(1, "data")]
    assert report["flagged"][0]["slower"] == pytest.approx(13 / 11)
    text = format_report(report)
    assert "optimizer step 200" in text and "<- 118% slower than the median, in data wait" in text
    assert text.count("<-") == 1, "the ranks that wait are not flagged"


def test_a_rank_slow_in_compute_is_flagged_for_compute_and_equal_ranks_are_not():
    ms = 1e-3
    report = analyse([[1 * ms, 30 * ms, 1 * ms, 32 * ms], [1 * ms, 10 * ms, 21 * ms, 32 * ms]] * 2, 0.2, 10)
    assert {(f["rank"], f["phase"]) for f in report["flagged"]} == {(0, "compute"), (2, "compute")}
    assert analyse([[1 * ms, 10 * ms, 1 * ms, 12 * ms]] * 4, 0.2, 10)["flagged"] == []
    slight = analyse([[1 * ms, 10 * ms, 1 * ms, 12 * ms], [1 * ms, 11 * ms, 1 * ms, 12 * ms]], 0.2, 10)
    assert slight["flagged"] == [], "within the threshold"
