"""DeepSpeed checkpoints: ZeRO 1, 2 and 3 in fp32 and bf16 save on 2 processes and resume there exactly
(optimizer state included); the gathered full state dict loads into a fresh plain model."""

from __future__ import annotations

import os
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


def _save_two(root: str, stage: int) -> tuple[Any, Any]:
    dist.init_process_group("gloo")
    try:
        with distributed(strategy="deepspeed", deepspeed={"zero_stage": stage}) as ctx:
            model, optimizer, loader = _fresh(0)
            run_loop(model, optimizer, loader)
            save_state(Path(root) / f"zero{stage}")
            saved = ds_strategy.full_state_dict(ctx, model)
            run_loop(model, optimizer, loader)
            return saved, ds_strategy.full_state_dict(ctx, model)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _load_one(root: str, stage: int) -> dict[str, Any]:
    dist.init_process_group("gloo")
    out: dict[str, Any] = {}
    try:
        with distributed(strategy="deepspeed", deepspeed={"zero_stage": stage}) as ctx:
            model = make_model(5)
            model, optimizer, loader = prepare(
                model, torch.optim.AdamW(model.parameters(), lr=1e-2), make_loader(4)
            )  # the same global batch as 2 x 2
            try:
                load_state(Path(root) / f"zero{stage}")
            except CheckpointError as e:
                out["error"] = str(e)
                return out
            out["loaded"] = ds_strategy.full_state_dict(ctx, model)
            run_loop(model, optimizer, loader)
            out["resumed"] = ds_strategy.full_state_dict(ctx, model)
        out["leftovers"] = sorted(p.name for p in Path(root).iterdir() if p.name.startswith("."))
        return out
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_zero_checkpoint_loads_on_another_number_of_processes(
    tmp_path: Path, deepspeed_ops: None, stage: int
):
    """ZeRO-1/2: resharded through DeepSpeed's universal checkpoint (weights and optimizer state: the
    resumed run continues exactly); ZeRO-3: an error naming the conversion (see _deepspeed_universal)."""
    saved, continued = run_ranks(_save_two, 2, str(tmp_path), stage, timeout=300)[0]
    out = run_ranks(_load_one, 1, str(tmp_path), stage, timeout=300)[0]
    if stage == 3:
        assert "ds_to_universal" in out["error"] and "saved by 2 processes" in out["error"], out
        return
    assert "error" not in out, out.get("error")
    assert max_difference(out["loaded"], saved) == 0.0
    assert max_difference(out["resumed"], continued) < 1e-6  # the optimizer state was restored too
    assert max_difference(continued, saved) > 1e-3
    assert out["leftovers"] == [], "the universal conversion was not removed"


class _Boom:
    """Unpickling it would run a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _payload_worker(root: str) -> str:
    """DeepSpeed's optimizer-state file replaced by a pickled payload (the manifest updated to match)."""
    import json

    from distrib.checkpointing._crc import crc32c

    dist.init_process_group("gloo")
    try:
        with distributed(strategy="deepspeed", deepspeed={"zero_stage": 2}) as ctx:
            _fresh(0)
            path = save_state(Path(root) / "ckpt")
            if ctx.rank == 0:
                name = "engine_0/zero_pp_rank_0_mp_rank_00_optim_states.pt"
                torch.save({"optimizer_state_dict": _Boom(f"{root}/pwned")}, path / name)
                data = (path / name).read_bytes()
                manifest = json.loads((path / "manifest.json").read_text())
                manifest["files"][name] = {"size": len(data), "crc32c": f"{crc32c(data):08x}"}
                (path / "manifest.json").write_text(json.dumps(manifest))
            dist.barrier()
        with distributed(strategy="deepspeed", deepspeed={"zero_stage": 2}):
            _fresh(5)
            try:
                load_state(path)
            except CheckpointError as e:
                return str(e)
            return "loaded"
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_a_pickled_payload_in_a_deepspeed_file_never_runs(tmp_path: Path, deepspeed_ops: None):
    messages = run_ranks(_payload_worker, 2, str(tmp_path), timeout=300)
    for message in messages:
        assert "weights_only=False" in message and "posix.system" in message, message
    assert not (tmp_path / "pwned").exists(), "the payload ran"
