"""Data on CUDA: batches arrive on the GPU, and a resume restores (and its fingerprint checks) the GPU
random state with no false alarm. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.gpu


def _prepared():
    from distrib import prepare

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)))
    return prepare(model, optimizer, DataLoader(data, batch_size=4, shuffle=True))


def test_resume_on_cuda_restores_and_checks_the_gpu_random_state(tmp_path: Path) -> None:
    from distrib import distributed
    from distrib.checkpointing import load_state, save_state

    with distributed(project_dir=str(tmp_path), seed=0) as ctx:
        model, _, loader = _prepared()
        it = iter(loader)
        (x,) = next(it)
        assert x.device.type == "cuda" and ctx.device.type == "cuda"
        model(x)  # dropout draws from the GPU generator
        save_state()
        expected_batch = next(it)[0].cpu()
        expected_draw = torch.rand(3, device="cuda").cpu()
        del it
    with distributed(project_dir=str(tmp_path), seed=1):
        _, _, loader = _prepared()
        load_state()  # would raise ResumeMismatchError if the GPU state were not restored
        assert torch.equal(torch.rand(3, device="cuda").cpu(), expected_draw)
        assert torch.equal(next(iter(loader))[0].cpu(), expected_batch)
