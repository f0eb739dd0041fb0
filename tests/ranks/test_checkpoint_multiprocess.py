"""Checkpoints on two real processes (gloo), in one launch: rotation, hooks on every rank, registered
objects, per-rank random states, the same error on every rank for a damaged file, and save_model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distrib import distributed, prepare, set_seed, wait_for_everyone
from distrib.checkpointing import (
    load_state,
    register_for_checkpointing,
    register_load_state_pre_hook,
    register_save_state_pre_hook,
    save_model,
    save_state,
)
from distrib.errors import CheckpointCorruptError
from distrib.testing import run_ranks

pytestmark = pytest.mark.slow


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def _hooks(rank: int, calls: list[str]) -> None:
    def on_save(models: list[nn.Module], directory: Path) -> None:
        calls.append(f"save:{directory.name.split('-')[1]}")
        (directory / f"notes_rank{rank}.txt").write_text(f"rank {rank}")

    def on_load(models: list[nn.Module], directory: Path) -> None:
        calls.append(f"load:{directory.name}:{(directory / f'notes_rank{rank}.txt').read_text()}")

    register_save_state_pre_hook(on_save)
    register_load_state_pre_hook(on_load)


def _scenario(workdir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with distributed(project_dir=workdir, total_limit=2) as ctx:
        set_seed(10, device_specific=True)  # every rank draws different numbers
        model = nn.Linear(16, 16)
        model, _ = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        counter = Counter()
        register_for_checkpointing(counter)
        calls: list[str] = []
        _hooks(ctx.rank, calls)
        for step in (1, 2, 3):
            ctx.state.optimizer_steps = step
            counter.value = step * 10
            path = save_state()
        out["kept"] = sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir())
        out["manifest_files"] = sorted(json.loads((path / "manifest.json").read_text())["files"])
        expected_draw = random.random()  # the first draw after the last save
        counter.value = -1
        random.seed(999)
        assert load_state("latest") == path
        out["counter"] = counter.value
        out["rng_restored"] = random.random() == expected_draw
        out["draw"] = expected_draw
        out["calls"] = calls
        out["release"] = str(save_model(model, Path(workdir) / "release"))
        if ctx.rank == 1:  # one rank damages the shared file; whichever rank checks it, both must raise
            target = path / "model_0.safetensors"
            target.write_bytes(target.read_bytes()[:-4] + b"\0\0\0\1")
        wait_for_everyone()
        try:
            load_state(path)
        except CheckpointCorruptError as e:
            out["error"] = str(e)
    return out


def test_checkpoints_on_two_processes(tmp_path: Path) -> None:
    results = run_ranks(_scenario, 2, str(tmp_path), timeout=120)
    for rank, out in enumerate(results):
        assert out["kept"] == ["step_000002", "step_000003"], "total_limit=2 keeps the two newest"
        assert {"notes_rank0.txt", "notes_rank1.txt", "rng_0.json", "rng_1.json"} <= set(
            out["manifest_files"]
        )
        assert out["counter"] == 30
        assert out["rng_restored"], f"rank {rank}: its own random state was not restored"
        # the second load's hooks run (they come before the model file is read and found damaged)
        assert out["calls"] == [
            "save:step_000001",
            "save:step_000002",
            "save:step_000003",
            f"load:step_000003:rank {rank}",
            f"load:step_000003:rank {rank}",
        ]
        assert "model_0.safetensors' does not match its crc32c checksum" in out["error"], "every rank raises"
    assert results[0]["draw"] != results[1]["draw"], "each rank has its own random state"
    release = Path(results[0]["release"])
    assert sorted(p.name for p in release.iterdir()) == ["model.safetensors"]
    assert set(load_file(release / "model.safetensors")) == {"weight", "bias"}
