"""Rank-aware logging and the progress bar, with ranks simulated by pushing a runtime of that rank.

tests/test_tracking_multiprocess.py checks the same on two real processes, including `in_order`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator

import pytest

import distrib
from distrib import _runtime
from distrib._runtime import Runtime
from distrib.errors import MissingExtraError
from tests._support.runtime import fake_runtime


@contextlib.contextmanager
def as_rank(rank: int, world_size: int = 2, local_rank: int | None = None) -> Iterator[Runtime]:
    """A runtime at `rank` on the thread-local stack, as a rank of a `world_size`-process job."""
    runtime = fake_runtime(rank, world_size, local_rank)
    _runtime.push(runtime)
    try:
        yield runtime
    finally:
        _runtime.pop(runtime)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_main_process_only_by_default(caplog: pytest.LogCaptureFixture) -> None:
    logger = distrib.get_logger("distrib.tests.main_only", log_level="INFO")
    with as_rank(1):
        logger.info("from main only")
        logger.warning("from every rank %d", 1, main_process_only=False)
    with as_rank(0):
        logger.info("from main only")
    assert messages(caplog) == ["from every rank 1", "from main only"]


def test_rank_prefix_names_rank_and_world_size(caplog: pytest.LogCaptureFixture) -> None:
    logger = distrib.get_logger("distrib.tests.prefix", log_level=logging.INFO, rank_prefix=True)
    with as_rank(1, world_size=4):
        logger.info("hello %s", "there", main_process_only=False)
    logger.info("outside")  # no scope: one process, rank 0 of 1
    assert messages(caplog) == ["[rank 1/4] hello there", "[rank 0/1] outside"]


def test_outside_a_scope_it_logs_as_a_single_process(caplog: pytest.LogCaptureFixture) -> None:
    logger = distrib.get_logger("distrib.tests.no_scope", log_level="DEBUG")
    logger.debug("plain")
    logger.info("ordered", in_order=True)
    assert messages(caplog) == ["plain", "ordered"]


def test_in_order_logs_on_every_rank(caplog: pytest.LogCaptureFixture) -> None:
    logger = distrib.get_logger("distrib.tests.in_order", log_level="INFO")
    with as_rank(1):  # no process group here: the turn is this rank's own
        logger.info("my turn", in_order=True)
    assert messages(caplog) == ["my turn"]


def test_log_level_filters_and_records_name_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    logger = distrib.get_logger("distrib.tests.level", log_level="WARNING")
    assert logger.logger.level == logging.WARNING
    logger.info("dropped")
    logger.error("kept")
    try:
        raise KeyError("boom")
    except KeyError:
        logger.exception("failed")
    assert messages(caplog) == ["kept", "failed"]
    assert {r.funcName for r in caplog.records} == {"test_log_level_filters_and_records_name_the_caller"}
    assert caplog.records[1].exc_info is not None and caplog.records[1].exc_info[0] is KeyError


def test_progress_bar_shows_outside_a_scope_and_on_local_main() -> None:
    for scope in (contextlib.nullcontext(), as_rank(2, world_size=4, local_rank=0)):
        out = io.StringIO()
        with scope:
            bar = distrib.progress_bar(range(3), desc="train", file=out)
            assert not bar.disable
            assert list(bar) == [0, 1, 2]
        assert "train" in out.getvalue() and "3/3" in out.getvalue()


def test_progress_bar_is_silent_off_the_local_main_process() -> None:
    out = io.StringIO()
    with as_rank(1):
        bar = distrib.progress_bar(range(4), desc="train", file=out)
        manual = distrib.progress_bar(total=10, file=out)
        assert bar.disable and manual.disable
        assert list(bar) == [0, 1, 2, 3]
        manual.update(5)
        manual.close()
    assert out.getvalue() == ""


def test_progress_bar_keeps_an_explicit_disable() -> None:
    out = io.StringIO()
    bar = distrib.progress_bar(range(2), disable=True, file=out)
    assert list(bar) == [0, 1] and bar.disable and out.getvalue() == ""


def test_progress_bar_without_tqdm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'distrib\[tqdm\]'"):
        distrib.progress_bar(range(2))
