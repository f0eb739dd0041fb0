"""DeepSpeed's JIT build lock on real processes: a lock left by an interrupted build no longer hangs every
later run, and a lock that a live build holds is reported, not waited on silently.

The runs use a temporary extensions directory (`TORCH_EXTENSIONS_DIR`) holding a copy of the op built in
the default cache, so no test compiles anything or touches the shared cache's lock."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distrib._build_lock import extensions_root
from distrib.testing import run_ranks

OP = "deepspeed_shm_comm"


@pytest.fixture(scope="module")
def built_op() -> Path:
    pytest.importorskip("deepspeed")
    from tests._support.models import build_deepspeed_ops

    build_deepspeed_ops()  # compiles once per machine (cached), outside the ranks' timeouts
    source = extensions_root({}) / OP
    if not (source / f"{OP}.so").is_file():
        pytest.skip(f"DeepSpeed's {OP} op is not built in {source}")
    return source


@pytest.fixture
def extensions(tmp_path: Path, built_op: Path) -> Path:
    shutil.copytree(built_op, tmp_path / OP, ignore=shutil.ignore_patterns("lock"))
    return tmp_path


def _deepspeed_scope() -> str:
    from distrib import distributed

    with distributed(strategy="deepspeed") as ctx:
        return ctx.strategy


def test_a_stale_lock_from_an_interrupted_build_is_removed_and_named(extensions, capfd):
    lock = extensions / OP / "lock"
    lock.touch()  # what an interrupted first run leaves behind
    results = run_ranks(_deepspeed_scope, 2, timeout=240, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert results == ["deepspeed", "deepspeed"]
    assert not lock.exists()
    err = capfd.readouterr().err
    assert f"removed a stale DeepSpeed JIT build lock {lock}" in err
    assert err.count("removed a stale") == 1, "one rank per machine removes it"


HOLDER = textwrap.dedent(
    """
    import os, sys, time
    lock = sys.argv[1]
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton does while it builds
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    os.close(fd)
    os.remove(lock)
    """
)


def test_a_lock_held_by_a_live_build_is_reported_and_waited_for(extensions, capfd):
    lock = extensions / OP / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock), "20"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        results = run_ranks(_deepspeed_scope, 2, timeout=240, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    finally:
        holder.wait(60)
    assert results == ["deepspeed", "deepspeed"]
    err = capfd.readouterr().err
    assert f"{lock} is held by process {holder.pid} on this machine" in err
