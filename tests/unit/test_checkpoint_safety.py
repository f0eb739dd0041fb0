"""Checkpoints under hostile or damaged input: malformed manifests and state files, names that leave the
checkpoint, files the manifest does not list, pickled code, rotation after a rollback, an explicit path
whose replacement was interrupted, and a full disk."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distrib import Runtime, distributed, prepare
from distrib.checkpointing import load_state, save_state
from distrib.checkpointing._crc import crc32c
from distrib.checkpointing._layout import latest_checkpoint
from distrib.errors import CheckpointCorruptError, CheckpointError

MANIFEST = "manifest.json"


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Runtime]:
    with distributed(project_dir=str(tmp_path / "proj")) as ctx:
        model = nn.Linear(8, 8)
        prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        yield ctx


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())  # type: ignore[no-any-return]


def _write_manifest(path: Path, manifest: Any) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest))


def _rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace a file and update its manifest entry, as someone who forges a checkpoint would."""
    (path / name).write_bytes(data)
    manifest = _manifest(path)
    manifest["files"][name] = {"size": len(data), "crc32c": f"{crc32c(data):08x}"}
    _write_manifest(path, manifest)


MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "missing files": lambda m: m.pop("files"),
    "null files": lambda m: m.update(files=None),
    "missing world_size": lambda m: m.pop("world_size"),
    "null step": lambda m: m.update(step=None),
    "string size": lambda m: m["files"]["rng_0.json"].update(size="12"),
    "null size": lambda m: m["files"]["rng_0.json"].update(size=None),
    "unknown hash": lambda m: m.update(checksum="md5"),
    "string format version": lambda m: m.update(format_version="2"),
    "future format version": lambda m: m.update(format_version=99),
    "boolean save counter": lambda m: m.update(save_counter=True),
    "short digest": lambda m: m["files"]["rng_0.json"].update(crc32c="abc"),
    "entry not a mapping": lambda m: m["files"].update({"rng_0.json": 5}),
    "not an object": lambda m: m.clear(),
}


@pytest.mark.parametrize("damage", list(MALFORMED))
def test_every_malformed_manifest_is_a_checkpoint_error_naming_it(run: Runtime, damage: str) -> None:
    path = save_state()
    manifest = _manifest(path)
    MALFORMED[damage](manifest)
    _write_manifest(path, manifest if manifest else [])
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json"):
        load_state(path)


@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname", "a/../../b", "./rng_0.json", "a\\b"])
def test_manifest_names_outside_the_checkpoint_are_refused(run: Runtime, tmp_path: Path, name: str) -> None:
    (tmp_path / "outside.json").write_text("{}")
    path = save_state()
    manifest = _manifest(path)
    manifest["files"][name] = {"size": 2, "crc32c": "00000000"}
    _write_manifest(path, manifest)
    with pytest.raises(CheckpointCorruptError, match=r"leaves the checkpoint|absolute path") as info:
        load_state(path)
    assert "2 bytes" not in str(info.value)  # nothing about the outside file is revealed


def test_a_symlink_out_of_the_checkpoint_is_refused(run: Runtime, tmp_path: Path) -> None:
    path = save_state()
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((path / "training_state.json").read_bytes())
    (path / "training_state.json").unlink()
    (path / "training_state.json").symlink_to(outside)
    with pytest.raises(CheckpointCorruptError, match="leads outside the checkpoint"):
        load_state(path, verify="size")


def test_a_file_the_manifest_no_longer_lists_is_not_loaded(run: Runtime) -> None:
    path = save_state()
    manifest = _manifest(path)
    del manifest["files"]["training_state.json"]
    _write_manifest(path, manifest)
    with pytest.raises(CheckpointCorruptError, match=r"training_state\.json' is not listed in the manifest"):
        load_state(path)


@pytest.mark.parametrize("name", ["training_state.json", "rng_0.json"])
@pytest.mark.parametrize("verify", ["checksum", "size"])
def test_undecodable_state_files_name_themselves(run: Runtime, name: str, verify: str) -> None:
    path = save_state()
    size = (path / name).stat().st_size
    garbage = b"\xff{" * size
    if verify == "checksum":
        _rewrite(path, name, garbage[:size])
    else:
        (path / name).write_bytes(garbage[:size])  # same size: only a parse can notice
    with pytest.raises(CheckpointCorruptError, match=rf"{name.replace('.', '[.]')}"):
        load_state(path, verify=verify)  # type: ignore[arg-type]


def test_state_files_with_wrong_structure_name_themselves(run: Runtime) -> None:
    path = save_state()
    _rewrite(path, "training_state.json", json.dumps({"optimizer_steps": "many"}).encode())
    with pytest.raises(CheckpointCorruptError, match=r"training_state\.json.* is malformed"):
        load_state(path)


def test_a_damaged_safetensors_header_names_the_file(run: Runtime) -> None:
    path = save_state()
    name = "model_0.safetensors"
    data = bytearray((path / name).read_bytes())
    data[8:12] = b"!!!!"  # inside the JSON header
    (path / name).write_bytes(bytes(data))
    for verify in ("size", "checksum"):
        with pytest.raises(CheckpointCorruptError, match=r"model_0\.safetensors"):
            load_state(path, verify=verify)  # type: ignore[arg-type]


class _Boom:
    """Unpickling it would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_payload_in_the_optimizer_file_never_runs(run: Runtime, tmp_path: Path) -> None:
    path = save_state()
    marker = tmp_path / "pwned"
    forged = tmp_path / "forged.pt"
    torch.save({"state": {}, "param_groups": [_Boom(marker)]}, forged)
    _rewrite(path, "optimizer_0.pt", forged.read_bytes())  # the manifest agrees: only unpickling can tell
    with pytest.raises(CheckpointCorruptError, match=r"optimizer_0\.pt.*weights_only=False"):
        load_state(path)
    assert not marker.exists()


def test_rotation_and_latest_follow_the_save_order_after_a_rollback(tmp_path: Path) -> None:
    """The scenario from the field: a run saved steps 5, 9 and 10, was resumed from step 5 and saved
    steps 6 and 7 with total_limit=3. The new branch's checkpoints are the newest."""
    root = tmp_path / "checkpoints"
    with distributed(project_dir=str(tmp_path), total_limit=3) as ctx:
        prepare(nn.Linear(2, 2))
        for step in (5, 9, 10):
            ctx.state.optimizer_steps = step
            save_state()
        load_state(root / "step_000005")
        for step in (6, 7):
            ctx.state.optimizer_steps = step
            just_saved = save_state()
            assert just_saved.exists(), "rotation deleted the checkpoint just saved"
        assert sorted(p.name for p in root.iterdir()) == ["step_000006", "step_000007", "step_000010"]
        assert latest_checkpoint(root) == root / "step_000007"
        assert load_state("latest") == root / "step_000007"
        assert ctx.state.optimizer_steps == 7


def test_an_explicit_path_is_exchanged_and_always_holds_a_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with distributed() as ctx:
        model = nn.Linear(2, 2)
        prepare(model)
        for step in (1, 2, 3):
            ctx.state.optimizer_steps = step
            save_state(target)
            assert _manifest(target)["step"] == step
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no leftovers


def test_an_interrupted_replacement_is_repaired_and_never_loses_the_only_copy(tmp_path: Path) -> None:
    """The state a crash leaves when the filesystem cannot exchange directories: the old checkpoint moved
    aside, the new one complete under its temporary name, nothing at the path."""
    target = tmp_path / "ckpt"
    with distributed() as ctx:
        model = nn.Linear(2, 2)
        prepare(model)
        ctx.state.optimizer_steps = 1
        save_state(target)
        old = tmp_path / ".old-ckpt-0000aaaa"
        os.replace(target, old)
        assert load_state(target) == target.absolute()  # repaired from the only complete copy
        assert ctx.state.optimizer_steps == 1 and not old.exists()

        ctx.state.optimizer_steps = 2
        save_state(target)
        os.replace(target, tmp_path / ".tmp-ckpt-0000bbbb")  # the new one, not yet renamed
        ctx.state.optimizer_steps = 1
        save_state(tmp_path / "other")
        (tmp_path / "other").rename(tmp_path / ".old-ckpt-0000cccc")  # and an older one, aside
        ctx.state.optimizer_steps = 3
        save_state(target)  # repairs first (the newest copy), then replaces it
        assert _manifest(target)["step"] == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (needs root and mount; skipped where unavailable)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_names_the_file_and_the_checkpoint_and_keeps_the_previous(small_disk: Path) -> None:
    with distributed(project_dir=str(small_disk)) as ctx:
        model = nn.Linear(64, 64)
        prepare(model)
        first = save_state()
        big = nn.Linear(1024, 1024)  # 4 MB: more than the disk holds
        prepare(big)
        ctx.state.optimizer_steps = 1
        with pytest.raises(
            CheckpointError, match=r"no space left on device while writing .*model_1\.safetensors"
        ):
            save_state()
        assert latest_checkpoint(small_disk / "checkpoints") == first
        assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == [first.name]


def _as_version_1(path: Path) -> None:
    """Rewrite a manifest the way distrib's first format wrote it: CRC-32 digests, no save counter."""
    import zlib

    manifest = _manifest(path)
    manifest.update(format_version=1, checksum="crc32")
    del manifest["save_counter"]
    manifest["files"] = {
        name: {"size": entry["size"], "crc32": f"{zlib.crc32((path / name).read_bytes()):08x}"}
        for name, entry in manifest["files"].items()
    }
    _write_manifest(path, manifest)


def test_checkpoints_of_the_first_format_still_load_and_verify(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    with distributed(project_dir=str(tmp_path)) as ctx:
        model = nn.Linear(8, 8)
        prepare(model)
        ctx.state.optimizer_steps = 9
        old = save_state()
        _as_version_1(old)
        ctx.state.optimizer_steps = 3
        new = save_state()  # saved later, with a smaller step: newer than any first-format checkpoint
        assert latest_checkpoint(root) == new
        assert load_state(old) == old and ctx.state.optimizer_steps == 9
        data = bytearray((old / "model_0.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (old / "model_0.safetensors").write_bytes(bytes(data))
        with pytest.raises(
            CheckpointCorruptError, match=r"model_0\.safetensors' does not match its crc32 checksum"
        ):
            load_state(old)
