"""DeepSpeed checkpoints: ZeRO 1, 2 and 3 in fp32 and bf16 save on 2 processes and resume there exactly
(optimizer state included); the gathered full state dict loads into a fresh plain model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from distrib import distributed, load_state, prepare, save_model, save_state, unwrap_model
from distrib.checkpointing._reader import CheckpointReader
from distrib.errors import CheckpointError
from distrib.strategies import deepspeed as ds_strategy
from distrib.testing import run_ranks
from tests._support.checkpoints import load_direct, save_direct
from tests._support.models import (
    TinyNet,
    build_deepspeed_ops,
    make_loader,
    make_model,
    max_difference,
    run_loop,
)

PROBE = torch.linspace(-1, 1, 16).reshape(2, 8)
COMBINATIONS = [(stage, mp) for stage in (1, 2, 3) for mp in ("no", "bf16")]


@pytest.fixture(scope="module")
def deepspeed_ops() -> None:
    pytest.importorskip("deepspeed")
    build_deepspeed_ops()


def _fresh(seed: int) -> tuple[Any, Any, Any]:
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return prepare(model, optimizer, make_loader())


def _save_and_resume(directory: Path, stage: int, mixed_precision: str) -> dict[str, Any]:
    settings = {
        "strategy": "deepspeed",
        "mixed_precision": mixed_precision,
        "deepspeed": {"zero_stage": stage},
    }
    out: dict[str, Any] = {}
    with distributed(**settings) as ctx:
        original = make_model(0)
        model, optimizer, loader = prepare(
            original, torch.optim.AdamW(original.parameters(), lr=1e-2), make_loader()
        )
        out["unwrapped"] = model is not original and unwrap_model(model) is original
        run_loop(model, optimizer, loader)
        save_direct(ctx, directory)
        if stage == 3:  # and through distrib's own checkpoints
            save_state(directory / "state")
            save_model(model, directory / "model")
        out["saved"] = ds_strategy.full_state_dict(ctx, model)
        output = model(PROBE).detach().float()
        run_loop(model, optimizer, loader)
        out["continued"] = ds_strategy.full_state_dict(ctx, model)
    if ctx.rank == 0:
        plain = TinyNet()
        plain.load_state_dict(out["saved"])  # strict: the user's names, no engine prefixes
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            out["plain_output_difference"] = (plain(PROBE).float() - output).abs().max().item()
    with distributed(**settings) as ctx:
        model, optimizer, loader = _fresh(5)  # other weights, empty optimizer state
        load_direct(ctx, directory)
        out["loaded"] = ds_strategy.full_state_dict(ctx, model)
        run_loop(model, optimizer, loader)
        out["resumed"] = ds_strategy.full_state_dict(ctx, model)
        try:
            empty = {"files": {}, "checksum": "crc32c", "world_size": ctx.world_size}
            ds_strategy.load_training_state(ctx, CheckpointReader(directory / "nothing", empty))
        except CheckpointError as exc:
            out["missing"] = str(exc)
    if stage == 3:
        with distributed(**settings) as ctx:
            model, optimizer, loader = _fresh(5)
            load_state(directory / "state")
            run_loop(model, optimizer, loader)
            out["load_state_resumed"] = ds_strategy.full_state_dict(ctx, model)
    return out


def _checkpoint_worker(root: str) -> dict[Any, Any]:
    dist.init_process_group("gloo")
    try:
        return {key: _save_and_resume(Path(root) / f"zero{key[0]}_{key[1]}", *key) for key in COMBINATIONS}
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(900)  # the first DeepSpeed run on a machine compiles a C++ op first
def test_every_zero_stage_saves_and_resumes_exactly_on_two_processes(tmp_path: Path, deepspeed_ops: None):
    results = run_ranks(_checkpoint_worker, 2, str(tmp_path), timeout=300)[0]
    for (stage, mp), out in results.items():
        label = f"ZeRO-{stage} {mp}"
        assert out["unwrapped"], label  # prepare returns the engine; unwrap_model gives the user's module
        assert max_difference(out["loaded"], out["saved"]) == 0.0, label
        assert max_difference(out["resumed"], out["continued"]) < 1e-6, label
        assert max_difference(out["continued"], out["saved"]) > 1e-3, label  # training went on
        assert out["plain_output_difference"] < (1e-5 if mp == "no" else 2e-2), label
        assert "holds no DeepSpeed checkpoint" in out["missing"], label
        assert (tmp_path / f"zero{stage}_{mp}" / "engine_0").is_dir(), label
        if stage == 3:
            assert max_difference(out["load_state_resumed"], out["continued"]) < 1e-6, label
            released = load_file(tmp_path / f"zero3_{mp}" / "model" / "model.safetensors")
            plain = TinyNet()
            plain.load_state_dict(released)  # save_model's output loads into the plain model
            assert max_difference(released, out["saved"]) == 0.0, label
