"""The collective checks with CUDA tensors over NCCL: results exact on the fast path, a skipped collective
and a shape mismatch raise on every rank instead of corrupting memory or hanging."""

from __future__ import annotations

import pytest
import torch

from distrib.testing import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def _cuda_worker() -> dict:
    from distrib import distributed, gather, gather_for_metrics, reduce, wait_for_everyone
    from distrib.errors import CollectiveMismatchError

    out: dict = {}
    with distributed() as ctx:
        device, r = ctx.device, ctx.rank
        for _ in range(3):  # first call (header), second (header again), third (fast path)
            logits = gather_for_metrics(torch.full((4, 3), float(r), device=device, dtype=torch.bfloat16))
            preds, labels = gather((torch.arange(2, device=device) + r, torch.tensor([r], device=device)))
        out["logits"] = (logits.device.type, logits.float().sum().item(), tuple(logits.shape))
        out["tuple"] = (preds.tolist(), labels.tolist())
        out["max"] = reduce(torch.tensor([float(r)], device=device), "max").item()
        try:
            gather(torch.zeros(2, 3 + r, device=device))
        except CollectiveMismatchError as exc:
            out["shape"] = str(exc)
        try:
            if r == 0:
                gather(torch.ones(1, device=device))
            wait_for_everyone()
        except CollectiveMismatchError as exc:
            out["skip"] = str(exc)
    return out


def test_checked_collectives_over_nccl():
    results = run_ranks(_cuda_worker, 2, timeout=240)
    for r in results:
        assert r["logits"] == ("cuda", 12.0, (8, 3))
        assert r["tuple"] == ([0, 1, 1, 2], [0, 1])
        assert r["max"] == 1.0
        assert (
            "bfloat16" not in r["shape"] and "float32[2, 3]" in r["shape"] and "float32[2, 4]" in r["shape"]
        )
        assert "the ranks called different collectives" in r["skip"]
