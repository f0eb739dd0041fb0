"""Big-model inference with layers on a GPU: dispatch across GPU, CPU and disk, CPU offload streaming."""

from __future__ import annotations

import pytest
import torch

from distrib import (
    cpu_offload,
    load_checkpoint_and_dispatch,
)
from tests._support.big_model import DISK_MAP, _copy, empty_net, run


@pytest.mark.gpu
def test_gpu_layers_cpu_and_disk_offload_match_the_plain_model(checkpoints, reference, tmp_path):
    device_map = {**DISK_MAP, "embed": 0, "head": 0, "blocks.0": 0}
    model = load_checkpoint_and_dispatch(
        empty_net(), checkpoints["sharded"], device_map=device_map, offload_folder=tmp_path
    )
    assert model.blocks[0].up.weight.device == torch.device("cuda", 0)
    assert model.blocks[3].up.weight.is_meta  # on "cpu" with a GPU main device: streamed in
    out = run(model, reference[1])
    assert out.device == torch.device("cuda", 0)
    torch.testing.assert_close(out.cpu(), reference[2], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_cpu_offload_streams_weights(reference):
    model = cpu_offload(_copy(reference[0]), execution_device=0)
    before = torch.cuda.memory_allocated(0)
    out = run(model, reference[1])
    assert out.device.type == "cuda"
    assert torch.cuda.memory_allocated(0) - before < 64 * 1024  # only the output stays
    torch.testing.assert_close(out.cpu(), reference[2], rtol=1e-4, atol=1e-5)
