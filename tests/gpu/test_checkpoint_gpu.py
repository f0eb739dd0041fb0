"""Checkpoints of CUDA state: loading into parameters on the GPU, and background saves whose snapshot goes
to pinned host memory without blocking the device (isolation from later kernels on the same stream)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def _prepared(width: int = 1024, layers: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from distrib import prepare

    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = prepare(model, optimizer)
    model(torch.randn(4, width, device="cuda")).sum().backward()
    optimizer.step()
    return model, optimizer


def test_cuda_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    from distrib import distributed, load_state, save_state

    with distributed() as ctx:
        assert ctx.device.type == "cuda"
        model, optimizer = _prepared()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        exp_avg = optimizer.state_dict()["state"][0]["exp_avg"].clone()
        path = save_state(tmp_path / "ckpt")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        optimizer.step()
        load_state(path)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
        assert next(model.parameters()).device.type == "cuda"


def test_background_save_of_cuda_state_is_isolated_and_blocks_briefly(tmp_path: Path) -> None:
    from distrib import distributed, load_state, save_state

    with distributed(project_dir=str(tmp_path)):
        model, _ = _prepared(layers=32)
        save_state(background=True).wait()  # allocates the pinned buffers
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        torch.cuda.synchronize()
        start = time.perf_counter()
        handle = save_state(background=True)
        blocking = time.perf_counter() - start
        with torch.no_grad():  # queued after the device-to-host copies on the same stream
            for p in model.parameters():
                p.add_(1.0)
        path = handle.wait()
        start = time.perf_counter()
        save_state(background=False)
        synchronous = time.perf_counter() - start
        load_state(path)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        print(f"background save blocked {blocking:.4f} s; a synchronous save took {synchronous:.4f} s")
