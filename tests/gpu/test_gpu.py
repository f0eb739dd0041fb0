"""Accelerator tests: real CUDA runs, skipped (with the reason shown) on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from distrib.testing import run_ranks

pytestmark = pytest.mark.gpu


def test_cuda_device_and_fp16_loss_scaling():
    from distrib import backward, distributed, optimizer_step_was_skipped, prepare

    with distributed(mixed_precision="fp16") as ctx:
        assert ctx.device.type == "cuda"
        model = torch.nn.Sequential(torch.nn.Linear(8, 1))
        inside: list[torch.dtype] = []  # the dtype inside the forward: outputs are cast back to float32
        model[0].register_forward_hook(lambda module, args, output: inside.append(output.dtype))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = prepare(model, optimizer)
        assert next(model.parameters()).device.type == "cuda"
        out = model(torch.randn(4, 8, device=ctx.device))
        assert out.dtype == torch.float32, "outputs come back in float32"
        assert inside == [torch.float16], "the forward ran under fp16 autocast"
        backward(out.float().pow(2).mean())
        optimizer.step()
        assert optimizer_step_was_skipped() is False
        # an overflowing loss makes the scaler skip the step and lower its scale
        backward(model(torch.randn(4, 8, device=ctx.device)).sum() * float("inf"))
        optimizer.step()
        assert optimizer_step_was_skipped() is True


def test_bf16_on_gpu():
    from distrib import distributed, prepare

    with distributed(mixed_precision="bf16"):
        net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        inside: list[torch.dtype] = []
        net[0].register_forward_hook(lambda module, args, output: inside.append(output.dtype))
        model = prepare(net)
        assert model(torch.randn(2, 8, device="cuda")).dtype == torch.float32
        assert inside == [torch.bfloat16], "the forward ran under bf16 autocast"


def _nccl_worker() -> dict:
    import torch.distributed as dist

    from distrib import distributed, gather

    with distributed() as ctx:
        return {
            "device": str(ctx.device),
            "backend": str(dist.get_backend()),
            "gathered": gather(torch.tensor([ctx.rank], device=ctx.device)).tolist(),
        }


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_gpus():
    results = run_ranks(_nccl_worker, 2, timeout=120)
    assert [r["device"] for r in results] == ["cuda:0", "cuda:1"]
    assert all("nccl" in r["backend"] and r["gathered"] == [0, 1] for r in results)
