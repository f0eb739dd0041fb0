"""save_state / load_state on one process: what is saved, the project layout, rotation, hooks, registered
objects, safe loading; save_model and save."""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distrib import Runtime, backward, distributed, prepare
from distrib.checkpointing import (
    load_state,
    register_for_checkpointing,
    register_load_state_pre_hook,
    register_save_state_pre_hook,
    save,
    save_model,
    save_state,
)
from distrib.checkpointing._files import checksum, parse_size
from distrib.errors import CheckpointCorruptError, CheckpointError


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Runtime]:
    with distributed(project_dir=str(tmp_path / "proj"), seed=0) as ctx:
        yield ctx


def _prepared() -> tuple[Any, Any, Any, Any]:
    """A prepared tied model, Adam, a shuffled loader and a scheduler (Any: prepared wrappers)."""
    model = TiedNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    loader = DataLoader(TensorDataset(torch.arange(40) % 10), batch_size=4, shuffle=True)
    return prepare(model, optimizer, loader, scheduler)  # type: ignore[no-any-return]


def _steps(model: Any, optimizer: Any, scheduler: Any, batches: Iterator[Any], n: int) -> None:
    for _ in range(n):
        (tokens,) = next(batches)
        backward(model(tokens).pow(2).mean())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_load_state_restores_everything_saved(run: Runtime) -> None:
    model, optimizer, loader, scheduler = _prepared()
    batches = iter(loader)
    _steps(model, optimizer, scheduler, batches, 3)
    path = save_state()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_exp_avg = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    draws = (torch.rand(3), random.random(), np.random.rand())
    _steps(model, optimizer, scheduler, batches, 2)  # move everything on
    assert load_state() == path
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model.head.weight is model.embed.weight  # still tied after loading
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_exp_avg)
    assert scheduler.get_last_lr() == pytest.approx([0.01 * 0.9**3])
    assert run.state.optimizer_steps == 3
    assert (loader.epoch, loader.batches_yielded) == (0, 3)
    assert (
        torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]
    )
    assert len(list(loader)) == len(loader) - 3  # resumes after the 3 batches already seen


def test_project_layout_names_and_manifest(run: Runtime, tmp_path: Path) -> None:
    root = tmp_path / "proj" / "checkpoints"
    assert save_state() == root / "step_000000"
    assert save_state() == root / "step_000000_1"  # the same step saved again gets a new name
    run.state.optimizer_steps = 120
    path = save_state()
    assert path == root / "step_000120"
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["step"], manifest["world_size"], manifest["strategy"]) == (120, 1, "single")
    assert {"distrib_version", "torch_version", "time", "contents"} <= set(manifest)
    assert manifest["checksum"] == "crc32c"
    assert manifest["save_counter"] == 2  # the third save into this folder
    for name, entry in manifest["files"].items():
        assert (path / name).stat().st_size == entry["size"]
        assert entry["crc32c"] == checksum(path / name, "crc32c")  # computed while writing, as read back
    assert load_state("latest") == path


def test_total_limit_deletes_only_older_complete_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    (root / "step_000001").mkdir(parents=True)  # incomplete (no manifest): never rotated, never loaded
    with distributed(project_dir=str(tmp_path), total_limit=2) as ctx:
        for step in (5, 10, 15, 20):
            ctx.state.optimizer_steps = step
            save_state()
        assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000015", "step_000020"]
        assert load_state("latest") == root / "step_000020"


def test_leftovers_of_interrupted_saves_are_ignored_then_removed(run: Runtime, tmp_path: Path) -> None:
    root = tmp_path / "proj" / "checkpoints"
    first = save_state()
    stale = root / ".tmp-step_000099-dead"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    (root / ".trash-step_000050-dead").mkdir()
    assert load_state("latest") == first
    save_state()
    assert not stale.exists() and not (root / ".trash-step_000050-dead").exists()


def test_latest_is_none_on_a_first_run(run: Runtime) -> None:
    assert load_state("latest") is None
    assert load_state() is None


def test_paths_that_are_not_checkpoints_are_refused(tmp_path: Path) -> None:
    with distributed() as ctx:
        with pytest.raises(CheckpointError, match="project_dir"):
            load_state("latest")
        with pytest.raises(CheckpointError, match="project_dir"):
            save_state()
        with pytest.raises(CheckpointError, match="does not exist"):
            load_state(tmp_path / "nowhere")
        user_dir = tmp_path / "notes"
        user_dir.mkdir()
        (user_dir / "todo.txt").write_text("keep me")
        with pytest.raises(CheckpointError, match="not a distrib checkpoint"):
            save_state(user_dir)
        assert (user_dir / "todo.txt").read_text() == "keep me"
        ctx.state.optimizer_steps = 7
        explicit = tmp_path / "ckpt"
        assert save_state(explicit) == explicit.absolute()
        assert save_state(explicit) == explicit.absolute()  # an earlier checkpoint is replaced
        assert json.loads((explicit / "manifest.json").read_text())["step"] == 7
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        folder = tmp_path / "runs" / "checkpoints"
        save_state(folder / "step_000007")
        with pytest.raises(CheckpointError, match=r"folder of checkpoints.*step_000007"):
            load_state(folder)


def test_hooks_add_files_and_can_be_removed(run: Runtime) -> None:
    _prepared()
    seen: list[tuple[str, Path, int]] = []

    def on_save(models: list[nn.Module], directory: Path) -> None:
        seen.append(("save", directory, len(models)))
        (directory / "extra.json").write_text('{"tokenizer": "v2"}')

    def on_load(models: list[nn.Module], directory: Path) -> None:
        seen.append(("load", directory, len(models)))
        assert (directory / "extra.json").read_text() == '{"tokenizer": "v2"}'

    save_handle = register_save_state_pre_hook(on_save)
    load_handle = register_load_state_pre_hook(on_load)
    path = save_state()
    assert "extra.json" in json.loads((path / "manifest.json").read_text())["files"]
    assert seen[0][0] == "save" and seen[0][1].name.startswith(".tmp-step_000000-") and seen[0][2] == 1
    load_state()
    assert seen[1] == ("load", path, 1)
    save_handle.remove()
    load_handle.remove()
    save_state()
    load_state()
    assert len(seen) == 2


class Ema:
    def __init__(self) -> None:
        self.value = torch.zeros(3)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"value": self.value.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value = state["value"]


class Opaque:
    """Not loadable with weights_only=True: its state holds an arbitrary class."""

    def __init__(self) -> None:
        self.payload: object = Ema()

    def state_dict(self) -> dict[str, object]:
        return {"payload": self.payload}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.payload = state["payload"]


def test_registered_objects_round_trip_and_need_both_methods(run: Runtime) -> None:
    ema = Ema()
    register_for_checkpointing(ema)
    ema.value = torch.tensor([1.0, 2.0, 3.0])
    save_state()
    ema.value = torch.zeros(3)
    load_state()
    assert torch.equal(ema.value, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(CheckpointError, match="without a load_state_dict\\(\\) method"):
        register_for_checkpointing(type("OnlySave", (), {"state_dict": lambda self: {}})())


def test_pickled_objects_load_only_when_trusted(run: Runtime) -> None:
    opaque = Opaque()
    register_for_checkpointing(opaque)
    save_state()
    with pytest.raises(CheckpointCorruptError, match=r"custom_0\.pt.*weights_only=False"):
        load_state()
    opaque.payload = None
    load_state(weights_only=False)
    assert isinstance(opaque.payload, Ema)


def test_gradient_scaler_is_saved(run: Runtime) -> None:
    run.state.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    run.state.scaler.scale(torch.ones(()))
    run.state.scaler.update(new_scale=512.0)
    save_state()
    run.state.scaler.update(new_scale=8.0)
    load_state()
    assert run.state.scaler.get_scale() == 512.0


def test_save_model_loads_with_plain_safetensors(run: Runtime, tmp_path: Path) -> None:
    model, *_ = _prepared()
    out = save_model(model, tmp_path / "release")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    fresh = TiedNet()
    fresh.load_state_dict(
        load_file(out / "model.safetensors")
    )  # strict: tied weights stored under both names
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_save_model_shards_with_an_index(run: Runtime, tmp_path: Path) -> None:
    model, *_ = _prepared()
    out = tmp_path / "release"
    save_model(model, out)
    save_model(model, out, max_shard_size=250)  # bytes: forces several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()  # the unsharded file of the earlier save is gone
    state = {k: v for name in shards for k, v in load_file(out / name).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert set(state) == set(index["weight_map"]) == set(model.state_dict())
    save_model(model, out, safe_serialization=False)
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_model.bin"]
    assert set(torch.load(out / "pytorch_model.bin", weights_only=True)) == set(model.state_dict())


def test_save_writes_state_dicts_as_safetensors_and_the_rest_with_torch(tmp_path: Path) -> None:
    weights = {"a": torch.ones(2), "b": torch.zeros(3)}
    save(weights, tmp_path / "w.safetensors")  # works without a scope, too
    assert torch.equal(load_file(tmp_path / "w.safetensors")["a"], weights["a"])
    save({"epoch": 3, "best": torch.tensor(0.5)}, tmp_path / "progress.pt")
    assert torch.load(tmp_path / "progress.pt", weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.pt", "w.safetensors"]


def test_checksums_match_the_standard_implementations(tmp_path: Path) -> None:
    data = bytes(range(256)) * 50_000  # several read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert checksum(path, "crc32") == f"{zlib.crc32(data):08x}"
    assert checksum(path, "sha256") == hashlib.sha256(data).hexdigest()
    check = tmp_path / "check"
    check.write_bytes(b"123456789")
    assert checksum(check, "crc32c") == "e3069283"  # the CRC-32C check value (RFC 3720)


def test_parse_size() -> None:
    assert parse_size("10GB") == 10**10
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(CheckpointError, match="cannot read the size"):
        parse_size("ten gigs")


def test_mid_window_saves_are_named_after_the_micro_step_and_saves_inside_accumulate_are_refused(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from distrib import accumulate, backward, distributed, prepare, save_state
    from distrib.errors import CheckpointError

    with distributed(cpu=True, project_dir=str(tmp_path), gradient_accumulation_steps=4):
        model = torch.nn.Linear(2, 1)
        loader = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2)
        model, optimizer, loader = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
        names = []
        for i, (x,) in enumerate(loader):
            with accumulate(model):
                backward(model(x).sum())
                optimizer.step()
                optimizer.zero_grad()
                if i == 0:
                    with pytest.raises(CheckpointError, match="inside `with accumulate"):
                        save_state()
            if i in (1, 3, 5):
                names.append(save_state().name)
    assert names == ["step_000000-micro_2", "step_000001", "step_000001-micro_2"]
