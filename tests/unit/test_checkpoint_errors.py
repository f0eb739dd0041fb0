"""Damaged and mismatched checkpoints fail with errors that name the file, the keys or the fix."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from distrib import Runtime, distributed, prepare
from distrib.checkpointing import load_state, save_state
from distrib.errors import CheckpointCorruptError, CheckpointMismatchError, DistribWarning
from distrib.strategies import single


@pytest.fixture
def saved(tmp_path: Path) -> Iterator[tuple[Runtime, nn.Module, Path]]:
    """A scope with a prepared model and optimizer, and a checkpoint of them."""
    with distributed(project_dir=str(tmp_path)) as ctx:
        model = nn.Linear(64, 64)
        model, _ = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        yield ctx, model, save_state()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the end of a safetensors file is tensor data, not the header
    path.write_bytes(bytes(data))


def test_a_flipped_byte_fails_the_checksum(saved: tuple[Runtime, nn.Module, Path]) -> None:
    _, _, path = saved
    _flip_last_byte(path / "model_0.safetensors")
    with pytest.raises(
        CheckpointCorruptError, match=r"model_0\.safetensors' does not match its crc32c checksum"
    ):
        load_state(path)


def test_verify_size_skips_hashing(saved: tuple[Runtime, nn.Module, Path]) -> None:
    _, model, path = saved
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _flip_last_byte(path / "model_0.safetensors")
    load_state(path, verify="size")  # no checksum: the flipped byte goes unnoticed, as documented
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_truncated_file_is_named_with_its_sizes(saved: tuple[Runtime, nn.Module, Path]) -> None:
    _, _, path = saved
    target = path / "optimizer_0.pt"
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[: size // 2])
    with pytest.raises(
        CheckpointCorruptError, match=rf"optimizer_0\.pt' has {size // 2} bytes, {size} expected"
    ):
        load_state(path, verify="size")


def test_a_missing_file_is_named(saved: tuple[Runtime, nn.Module, Path]) -> None:
    _, _, path = saved
    (path / "rng_0.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"rng_0\.json' is missing"):
        load_state(path)


def test_a_missing_manifest_means_incomplete(saved: tuple[Runtime, nn.Module, Path]) -> None:
    _, _, path = saved
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json' is missing.*not a complete"):
        load_state(path)
    assert load_state("latest") is None  # and it no longer counts as a checkpoint


def test_a_garbled_manifest_is_named(saved: tuple[Runtime, nn.Module, Path]) -> None:
    _, _, path = saved
    (path / "manifest.json").write_text('{"format": "distrib-checkpoint", "files": ')
    with pytest.raises(CheckpointCorruptError, match=r"cannot read .*manifest\.json"):
        load_state(path)


def test_a_different_number_of_models(saved: tuple[Runtime, nn.Module, Path]) -> None:
    _, _, path = saved
    prepare(nn.Linear(2, 2))
    with pytest.raises(CheckpointMismatchError, match="1 models saved, 2 in this run"):
        load_state(path)


def test_a_different_number_of_optimizers(tmp_path: Path) -> None:
    with distributed() as ctx:
        model = prepare(nn.Linear(2, 2))
        path = save_state(tmp_path / "ckpt")
        prepare(torch.optim.SGD(model.parameters(), lr=0.1))
        with pytest.raises(CheckpointMismatchError, match="0 optimizers saved, 1 in this run"):
            load_state(path)
        assert ctx.state.optimizers


def test_mismatched_model_keys_are_listed(tmp_path: Path) -> None:
    with distributed():
        prepare(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
        path = save_state(tmp_path / "ckpt")
    with distributed():
        prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)))
        with pytest.raises(CheckpointMismatchError) as info:
            load_state(path)
    message = str(info.value)
    assert "model_0.safetensors does not match model #0 (Sequential)" in message
    assert "missing from the checkpoint: 2.weight, 2.bias" in message
    assert "not in the model: 1.weight, 1.bias" in message


def test_mismatched_shapes_are_listed(tmp_path: Path) -> None:
    with distributed():
        prepare(nn.Linear(4, 2))
        path = save_state(tmp_path / "ckpt")
    with distributed():
        prepare(nn.Linear(4, 3))
        with pytest.raises(CheckpointMismatchError, match=r"weight \(2, 4\) vs \(3, 4\)"):
            load_state(path)


def _pretend_saved_by(path: Path, world_size: int) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["world_size"] = world_size  # the manifest lists other files, not itself
    manifest["dp_world_size"] = world_size  # a plain data-parallel run
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_world_size_change_where_the_strategy_cannot_reshard(
    saved: tuple[Runtime, nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, path = saved
    _pretend_saved_by(path, 4)
    monkeypatch.setattr(single, "CHECKPOINT_WORLD_SIZE_DEPENDENT", True)
    with pytest.raises(CheckpointMismatchError, match=r"saved by 4 processes.*--num-processes 4"):
        load_state(path)


def test_world_size_change_where_the_strategy_reshards(saved: tuple[Runtime, nn.Module, Path]) -> None:
    _, _, path = saved
    _pretend_saved_by(path, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DistribWarning)  # exact at any world size: nothing to warn about
        assert load_state(path) == path
