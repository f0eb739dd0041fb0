"""N-D parallelism on CUDA with NCCL, and context parallelism (CUDA only): each layout against the same
training on one GPU. Tests needing two GPUs skip on a one-GPU machine, with the reason shown."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distrib.testing import run_ranks
from tests._support.parallel import PLAN, max_difference, train

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
TOL = 1e-4  # CUDA kernels sum in other orders than the CPU's


def _mesh_worker() -> dict[str, Any]:
    from distrib import context_parallel, distributed

    out = train(epochs=1, strategy="fsdp", parallelism={"dp_shard": -1})
    with distributed(strategy="fsdp", parallelism={"dp_shard": -1}) as ctx:
        x = torch.arange(8, device=ctx.device).view(1, 8)
        with context_parallel(x):  # cp=1: nothing to split
            out["unchanged"] = x.tolist()
        out["mesh"] = (
            ctx.mesh.device_type,
            str(torch.distributed.get_backend(ctx.mesh.get_group("dp_shard"))),
        )
    return out


def test_one_gpu_mesh_runs_on_nccl():
    (result,) = run_ranks(_mesh_worker, 1, timeout=300)
    reference = train(epochs=1)
    assert max_difference(result["state"], reference["state"]) < TOL
    assert result["mesh"][0] == "cuda" and "nccl" in result["mesh"][1]
    assert result["unchanged"] == [list(range(8))]


@two_gpus
@pytest.mark.parametrize(
    "settings",
    [
        {"parallelism": {"tp": 2, "tp_plan": PLAN}},
        {"strategy": "fsdp", "parallelism": {"tp": 2, "tp_plan": PLAN}},
        {"parallelism": {"pp": 2, "pp_schedule": "1f1b"}},
        {"strategy": "fsdp", "parallelism": {"pp": 2, "pp_schedule": "gpipe"}},
    ],
    ids=["tp", "fsdp-tp", "pp-1f1b", "fsdp-pp-gpipe"],
)
def test_nccl_layouts_equal_one_gpu(settings):
    reference = train(epochs=2)
    results = run_ranks(train, 2, timeout=300, epochs=2, **settings)
    assert max_difference(results[0]["state"], reference["state"]) < TOL
    assert max(abs(a - b) for a, b in zip(results[0]["losses"], reference["losses"], strict=True)) < TOL


# -- context parallel -----------------------------------------------------------------------------------

SEQ, WIDTH, HEADS, VOCAB = 32, 32, 4, 64


class Attention(nn.Module):
    """A causal self-attention block on torch's scaled_dot_product_attention (what CP swaps for ring
    attention), with no position embedding: sequence slices need no position offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.out(y.transpose(1, 2).reshape(b, s, WIDTH)))


def _train_attention(**settings: Any) -> dict[str, Any]:
    from distrib import backward, context_parallel, distributed, prepare, reduce, unwrap_model

    data = torch.randint(0, VOCAB, (8, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with distributed(**settings) as ctx:
        torch.manual_seed(0)
        model = Attention()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer, loader = prepare(model, optimizer, DataLoader(TensorDataset(data), batch_size=4))
        losses = []
        for (batch,) in loader:
            ids, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            with context_parallel(ids, labels, seq_dims=(1, 1)):
                logits = model(ids)
                loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
                backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(reduce(loss.detach(), "mean")))
        state = {k: v.detach().float().cpu().clone() for k, v in unwrap_model(model).state_dict().items()}
        return {"losses": losses, "state": state, "cp": (ctx.cp_rank, ctx.cp_size)}


@two_gpus
def test_context_parallel_equals_one_gpu():
    reference = _train_attention()
    results = run_ranks(_train_attention, 2, timeout=300, parallelism={"cp": 2})
    assert [r["cp"] for r in results] == [(0, 2), (1, 2)]
    assert max(abs(a - b) for a, b in zip(results[0]["losses"], reference["losses"], strict=True)) < 1e-3
    assert max_difference(results[0]["state"], reference["state"]) < 1e-3


def _bad_length() -> str:
    from distrib import context_parallel, distributed
    from distrib.errors import TrainingError

    with distributed(parallelism={"cp": 2}) as ctx:
        ids = torch.zeros(2, 6, dtype=torch.long, device=ctx.device)  # 6 is no multiple of 2 * cp = 4
        try:
            with context_parallel(ids):
                pass
        except TrainingError as exc:
            return str(exc)
    return "no error"


@two_gpus
def test_context_parallel_refuses_a_sequence_it_cannot_split():
    assert all("multiple of 2 * cp = 4" in message for message in run_ranks(_bad_length, 2, timeout=120))
