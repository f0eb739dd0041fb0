"""Background saves on one process: snapshot isolation, the handle, one save in flight, errors that are
raised at wait(), at the next save or at scope exit (once, never lost), and the `background_saves`
setting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distrib import Runtime, SaveHandle, distributed, prepare
from distrib.checkpointing import load_state, save_state
from distrib.checkpointing._layout import latest_checkpoint
from distrib.errors import CheckpointError


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Runtime]:
    with distributed(project_dir=str(tmp_path / "proj"), total_limit=2) as ctx:
        yield ctx


def _prepared() -> tuple[Any, Any]:
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model, optimizer = prepare(model, optimizer)
    model(torch.ones(2, 32)).sum().backward()
    optimizer.step()
    return model, optimizer


def _state(model: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


def test_changes_after_the_call_never_reach_the_checkpoint(run: Runtime) -> None:
    model, optimizer = _prepared()
    before = _state(model, optimizer)
    handle = save_state(background=True)
    assert isinstance(handle, SaveHandle)
    with torch.no_grad():  # right after the call, while the files are being written
        for p in model.parameters():
            p.add_(1.0)
    optimizer.step()
    path = handle.wait()
    assert handle.done() and path == handle.path and Path(handle) == path
    changed = _state(model, optimizer)
    assert any(not torch.equal(changed[k], v) for k, v in before.items())
    assert load_state(path) == path
    after = _state(model, optimizer)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the checkpoint holds later values"


def test_the_next_save_waits_for_the_one_in_flight_and_rotation_keeps_it(run: Runtime) -> None:
    _prepared()
    handles = []
    for step in (1, 2, 3):
        run.state.optimizer_steps = step
        handles.append(save_state(background=True))
        assert all(h.done() for h in handles[:-1]), "two saves in flight"
    last = handles[-1].wait()
    root = last.parent
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]  # total_limit=2
    assert latest_checkpoint(root) == last
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["save_counter"] == 2


def _break_the_next_write(optimizer: Any) -> None:
    """An optimizer state that snapshots fine but cannot be pickled: the background write fails."""
    optimizer.param_groups[0]["callback"] = lambda: None


def test_a_background_error_is_raised_by_wait_and_only_once(run: Runtime) -> None:
    _, optimizer = _prepared()
    _break_the_next_write(optimizer)
    handle = save_state(background=True)
    with pytest.raises(CheckpointError, match=r"optimizer_0\.pt' cannot be saved"):
        handle.wait()
    del optimizer.param_groups[0]["callback"]
    path = save_state()  # already delivered: not raised again
    assert latest_checkpoint(path.parent) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "the failed save left files"


def test_a_background_error_is_raised_by_the_next_save(run: Runtime) -> None:
    _, optimizer = _prepared()
    first = save_state()
    _break_the_next_write(optimizer)
    save_state(background=True)
    del optimizer.param_groups[0]["callback"]
    with pytest.raises(CheckpointError, match=r"optimizer_0\.pt' cannot be saved"):
        save_state()
    assert latest_checkpoint(first.parent) == first  # the failed save never became "latest"
    assert load_state("latest") == first


def test_a_background_error_is_raised_at_scope_exit(tmp_path: Path) -> None:
    scope = distributed(project_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"optimizer_0\.pt' cannot be saved"), scope:
        _, optimizer = _prepared()
        _break_the_next_write(optimizer)
        save_state(background=True)


def test_the_scope_exit_finishes_the_save_in_flight(tmp_path: Path) -> None:
    with distributed(project_dir=str(tmp_path)):
        _prepared()
        handle = save_state(background=True)
    assert handle.done()
    assert latest_checkpoint(tmp_path / "checkpoints") == handle.path


def test_the_background_saves_setting_makes_it_the_default(tmp_path: Path) -> None:
    with distributed(project_dir=str(tmp_path), background_saves=True):
        _prepared()
        handle = save_state()
        assert isinstance(handle, SaveHandle)
        assert isinstance(save_state(background=False), Path)  # finishes the one in flight first
        assert handle.done()
        assert load_state("latest") is not None  # waits for any save in flight, then loads


def test_snapshot_buffers_are_reused_and_still_isolated(run: Runtime) -> None:
    model, _ = _prepared()
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        handle = save_state(background=True)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(-value)
        handle.wait()
        load_state(handle.path)
        assert {float(v) for p in model.parameters() for v in p.detach().unique()} == {value}


def test_large_optimizer_files_load_memory_mapped_and_verified(
    run: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optimizer files above the threshold are memory-mapped while a thread checks their CRC-32C."""
    from distrib.checkpointing import _reader

    monkeypatch.setattr(_reader, "_MMAP_FROM", 1)
    model, optimizer = _prepared()
    before = _state(model, optimizer)
    path = save_state()
    optimizer.step()
    load_state(path)
    after = _state(model, optimizer)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    optimizer.step()  # the loaded state is writable (copy-on-write pages of the mapping)
    data = bytearray((path / "optimizer_0.pt").read_bytes())
    data[-30] ^= 0xFF
    (path / "optimizer_0.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer_0\.pt' does not match its crc32c checksum"):
        load_state(path)


def test_extra_parts_are_saved_snapshotted_and_restored_last(run: Runtime) -> None:
    """The extension point other features use (e.g. the resume fingerprint)."""
    from distrib.checkpointing import _state

    seen: dict[str, Any] = {}

    def save(runtime: Any, writer: Any) -> None:
        writer.json(f"extra_{runtime.rank}.json", {"step": runtime.state.optimizer_steps})

    def load(runtime: Any, reader: Any) -> None:
        seen["value"] = reader.json(f"extra_{runtime.rank}.json")
        seen["draw_is_restored"] = torch.rand(1).item() == seen.get("expected_draw")

    _state.EXTRA_PARTS.append((save, load))
    try:
        _prepared()
        run.state.optimizer_steps = 4
        handle = save_state(background=True)
        run.state.optimizer_steps = 5  # after the call: not in the checkpoint
        seen["expected_draw"] = torch.rand(1).item()
        load_state(handle.wait())
    finally:
        _state.EXTRA_PARTS.clear()
    assert seen["value"] == {"step": 4}
    assert seen["draw_is_restored"], "extra parts load after the random states"
