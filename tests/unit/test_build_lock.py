"""DeepSpeed's JIT build locks: a stale lock is removed with a warning, a held one is reported, a recent
one on a shared file system is explained; nothing waits silently."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from distrib import _build_lock
from distrib._build_lock import (
    LockState,
    clear_stale,
    describe,
    extensions_root,
    file_system_type,
    inspect_lock,
)
from distrib.errors import DistribWarning

MOUNTS = """\
/dev/sda1 / ext4 rw 0 0
server:/export/home /home nfs4 rw 0 0
/dev/sdb1 /home/local xfs rw 0 0
"""


def test_the_file_system_type_is_the_longest_mount_point(tmp_path):
    assert file_system_type(Path("/home/alice/.cache/x/lock"), MOUNTS) == "nfs4"
    assert file_system_type(Path("/home/local/x/lock"), MOUNTS) == "xfs"
    assert file_system_type(Path("/opt/x"), MOUNTS) == "ext4"
    assert (
        _build_lock.is_shared("nfs4")
        and _build_lock.is_shared("fuse.sshfs")
        and not _build_lock.is_shared("ext4")
    )


def test_the_root_honours_torch_extensions_dir(tmp_path):
    assert extensions_root({"TORCH_EXTENSIONS_DIR": str(tmp_path)}) == tmp_path
    default = extensions_root({})
    assert default.name.startswith("py") and default.name.endswith(
        "_cpu" if torch.version.cuda is None else ""
    )


def _lock(root: Path, name: str = "deepspeed_shm_comm", age: float = 0.0) -> Path:
    path = root / name / "lock"
    path.parent.mkdir(parents=True)
    path.touch()
    if age:
        old = time.time() - age
        os.utime(path, (old, old))
    return path


def test_a_lock_this_process_holds_open_is_a_build_in_progress(tmp_path):
    path = _lock(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        state = inspect_lock(path)
        assert state is not None and os.getpid() in state.holders and not state.stale
        assert f"{path} is held by process {os.getpid()} on this machine" in describe(state)
    finally:
        os.close(fd)
    assert inspect_lock(path).holders == ()


def test_staleness():
    local = LockState(Path("/x/lock"), 5.0, (), shared=False)
    shared_recent = LockState(Path("/x/lock"), 5.0, (), shared=True)
    shared_old = LockState(Path("/x/lock"), _build_lock.MAX_BUILD_SECONDS + 1, (), shared=True)
    held = LockState(Path("/x/lock"), 10_000.0, (123,), shared=False)
    assert local.stale and not shared_recent.stale and shared_old.stale and not held.stale
    assert "rm /x/lock" in describe(shared_recent) and "another machine may be building" in describe(
        shared_recent
    )


class _Rank:
    def __init__(self, rank: int = 0, local_rank: int = 0) -> None:
        self.rank, self.local_rank = rank, local_rank


def test_a_stale_lock_is_removed_with_a_warning_naming_it(tmp_path):
    path = _lock(tmp_path, age=3.0)
    with pytest.warns(DistribWarning, match=rf"removed a stale DeepSpeed JIT build lock {path}"):
        states = clear_stale(tmp_path, _Rank(), MOUNTS)
    assert not path.exists() and [s.path for s in states] == [path]


def test_only_one_rank_per_machine_removes_it(tmp_path):
    path = _lock(tmp_path)
    clear_stale(tmp_path, _Rank(rank=3, local_rank=1), MOUNTS)
    assert path.exists(), "local rank 1 leaves it to local rank 0"


def test_a_held_lock_is_reported_and_kept(tmp_path, capsys):
    path = _lock(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        clear_stale(tmp_path, _Rank(), MOUNTS)
    finally:
        os.close(fd)
    assert path.exists()
    assert f"{path} is held by process" in capsys.readouterr().err


def _wait_in_baton(path: Path) -> threading.Thread:
    from torch.utils.file_baton import FileBaton

    waiter = threading.Thread(target=FileBaton(str(path), wait_seconds=0.01).wait)
    waiter.start()
    return waiter


def _stderr_until(capsys, text: str) -> str:
    deadline, seen = time.monotonic() + 30, ""
    while text not in seen and time.monotonic() < deadline:
        seen += capsys.readouterr().err
        time.sleep(0.05)
    return seen


def test_a_thread_waiting_on_a_held_lock_is_told_who_holds_it(tmp_path, capsys):
    path = _lock(tmp_path)
    fd = os.open(path, os.O_RDONLY)  # this process "builds"
    waiter = _wait_in_baton(path)
    stop = _build_lock.watch(waiter.ident, every=0.05)
    try:
        err = _stderr_until(capsys, "still waiting")
    finally:
        stop()
        os.close(fd)
        path.unlink()
        waiter.join()
    assert f"still waiting for a JIT build lock: DeepSpeed's JIT build lock {path} is held by process" in err


def test_a_lock_that_goes_stale_while_waiting_is_removed_and_the_wait_ends(tmp_path, capsys):
    path = _lock(tmp_path)
    waiter = _wait_in_baton(path)
    stop = _build_lock.watch(waiter.ident, every=0.05)
    try:
        waiter.join(60)
    finally:
        stop()
    assert not waiter.is_alive() and not path.exists()
    err = _stderr_until(capsys, "removed")
    assert f"removed a stale DeepSpeed JIT build lock {path}" in err and "run again" in err
