"""What only a GPU can show, one process each (the accelerator machine has one GPU): the NCCL group of the
sharded strategies, FSDP2 in fp16 with pinned CPU offload, DeepSpeed on CUDA, fp8 where the capability
allows, and collectives' tensors on the device."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from distrib import FSDPOptions, _preemption, backward, distributed, gather, prepare, reduce

pytestmark = pytest.mark.gpu


def _train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    torch.manual_seed(0)
    losses = []
    for _ in range(5):
        loss = model(torch.randn(16, 32, device=device)).square().mean()
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses[-1] / losses[0]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))


def test_fsdp_fp16_with_pinned_cpu_offload_on_nccl():
    import torch.distributed as dist
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    with distributed(strategy="fsdp", mixed_precision="fp16", fsdp=FSDPOptions(cpu_offload=True)) as ctx:
        assert ctx.device.type == "cuda" and "nccl" in str(dist.get_backend())
        assert isinstance(ctx.state.scaler, ShardedGradScaler)
        model = _net()
        model, optimizer = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        assert all(p.device.type == "cpu" for p in model.parameters()), "offloaded shards live on the CPU"
        assert _train_steps(model, optimizer, ctx.device) < 1.0


def test_ddp_with_device_ids_and_collectives_on_the_device():
    with distributed(strategy="ddp") as ctx:
        assert ctx.collective_device == ctx.device
        model = _net()
        model, optimizer = prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
        assert next(model.parameters()).is_cuda
        assert _train_steps(model, optimizer, ctx.device) < 1.0
        assert gather(torch.ones(2, device=ctx.device)).is_cuda
        assert float(reduce(torch.ones(1, device=ctx.device))) == ctx.world_size
        # the per-step preemption flag travels over the group's gloo side: reading it never syncs the GPU
        assert _preemption._agreement_device(ctx) == torch.device("cpu")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
@pytest.mark.parametrize(("stage", "precision"), [(2, "bf16"), (3, "fp16")])
def test_deepspeed_on_cuda(stage: int, precision: str):
    with distributed(strategy="deepspeed", mixed_precision=precision, deepspeed={"zero_stage": stage}) as ctx:
        model = _net()
        model, optimizer = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        dtype = next(model.module.parameters()).dtype
        assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        assert _train_steps(model, optimizer, ctx.device) < 1.0


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 needs compute capability 8.9 or newer",
)
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="fp8 needs torchao")
def test_fp8_is_converted_before_fsdp_shards():
    with distributed(strategy="fsdp", mixed_precision="fp8") as ctx:
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
        model, optimizer = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        assert "Float8" in type(model[0]).__name__, type(model[0]).__name__
        assert _train_steps_fp8(model, optimizer, ctx.device) < 1.5


def _train_steps_fp8(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    losses = []
    for _ in range(3):
        loss = model(torch.randn(32, 64, device=device)).square().mean()
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses[-1] / losses[0]
