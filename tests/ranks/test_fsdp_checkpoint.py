"""FSDP checkpoints: sharded save on 2 processes, resume on 2 and on 1 (DCP re-shards), and the full state
dict loading into a fresh plain model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from distrib import distributed, load_state, prepare, save_model, save_state
from distrib.errors import CheckpointError, DistribWarning
from distrib.strategies import fsdp
from distrib.testing import run_ranks
from tests._support.checkpoints import load_direct, save_direct
from tests._support.models import TinyNet, make_loader, make_model, max_difference, run_loop

PROBE = torch.linspace(-1, 1, 16).reshape(2, 8)


def _fresh(seed: int, batch_size: int = 2) -> tuple[Any, Any, Any]:
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return prepare(model, optimizer, make_loader(batch_size))


def _checkpoint_worker(root: str) -> dict[str, Any]:
    directory = Path(root) / "direct"
    dist.init_process_group("gloo")
    try:
        out: dict[str, Any] = {}
        with distributed(strategy="fsdp") as ctx:
            model, optimizer, loader = _fresh(0)
            run_loop(model, optimizer, loader)
            save_direct(ctx, directory)
            save_state(Path(root) / "state")
            save_model(model, Path(root) / "model")
            out["saved"] = fsdp.full_state_dict(ctx, model)
            output = model(PROBE).detach()
            run_loop(model, optimizer, loader)
            out["continued"] = fsdp.full_state_dict(ctx, model)
        if ctx.rank == 0:
            plain = TinyNet()
            plain.load_state_dict(out["saved"])  # strict: same names, no FSDP prefixes
            out["plain_output_difference"] = (plain(PROBE) - output).abs().max().item()
        with distributed(strategy="fsdp") as ctx:
            model, optimizer, loader = _fresh(5)  # different weights, empty optimizer state
            load_direct(ctx, directory)
            out["loaded"] = fsdp.full_state_dict(ctx, model)
            run_loop(model, optimizer, loader)
            out["resumed"] = fsdp.full_state_dict(ctx, model)
        with distributed(strategy="fsdp") as ctx:  # the same through distrib's own checkpoints
            model, optimizer, loader = _fresh(5)
            load_state(Path(root) / "state")
            out["load_state"] = fsdp.full_state_dict(ctx, model)
            run_loop(model, optimizer, loader)
            out["load_state_resumed"] = fsdp.full_state_dict(ctx, model)
        return out
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_sharded_checkpoint_resumes_on_two_processes_and_on_one(tmp_path: Path):
    out = run_ranks(_checkpoint_worker, 2, str(tmp_path), timeout=240)[0]
    assert out["plain_output_difference"] < 1e-6
    for loaded, resumed in (("loaded", "resumed"), ("load_state", "load_state_resumed")):
        assert max_difference(out[loaded], out["saved"]) == 0.0
        # resuming reproduces the uninterrupted run, optimizer state included
        assert max_difference(out[resumed], out["continued"]) < 1e-6
    assert max_difference(out["continued"], out["saved"]) > 1e-3
    assert len(list((tmp_path / "direct").glob("*.distcp"))) == 2  # one shard file per rank
    released = TinyNet()
    released.load_state_dict(load_file(tmp_path / "model" / "model.safetensors"))  # save_model's output
    assert max_difference(released.state_dict(), out["saved"]) == 0.0

    for resume in ("direct", "load_state"):  # one process: DCP re-shards the two ranks' shards
        with distributed(strategy="fsdp") as ctx:
            model, optimizer, loader = _fresh(5, batch_size=4)  # the same global batch as 2 x 2
            if resume == "direct":
                load_direct(ctx, tmp_path / "direct")
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", DistribWarning)  # exact on 1 process: nothing to warn
                    load_state(tmp_path / "state")
            assert max_difference(fsdp.full_state_dict(ctx, model), out["saved"]) == 0.0, resume
            run_loop(model, optimizer, loader)
            assert max_difference(fsdp.full_state_dict(ctx, model), out["continued"]) < 1e-5, resume


def test_loading_a_checkpoint_of_other_models_is_a_checkpoint_error(tmp_path: Path):
    with distributed(strategy="fsdp") as ctx:
        _fresh(0)
        save_direct(ctx, tmp_path)
    with distributed(strategy="fsdp") as ctx:
        prepare(torch.nn.Linear(3, 3))
        with pytest.raises(CheckpointError, match="same models and optimizers"):
            load_direct(ctx, tmp_path)
