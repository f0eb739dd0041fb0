"""Shared pieces of the FSDP and DeepSpeed tests: a tiny transformer-like model and one training loop.

Workers open one process group themselves and run several `distributed(...)` scopes in it (each scope
reuses the group), so one launch compares many strategies against the same DDP reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WIDTH = 8
NUM_SAMPLES = 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.linear(x)))


class TinyNet(nn.Module):
    def __init__(self, num_blocks: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(num_blocks)])
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def make_loader(batch_size: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, WIDTH, generator=generator)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def run_loop(model: Any, optimizer: Any, loader: Any, *, clip: float | None = None) -> list[float]:
    """The user's loop, unchanged across strategies; returns the clipping norms of the sync steps."""
    from distrib import accumulate, backward, clip_grad_norm_, current

    norms = []
    for x, y in loader:
        with accumulate(model):
            backward(nn.functional.cross_entropy(model(x), y))
            if clip is not None and current().sync_gradients:
                norms.append(float(clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
            optimizer.zero_grad()
    return norms


def train(
    strategy: str,
    *,
    clip: float | None = None,
    model: nn.Module | None = None,
    batch_size: int = 2,
    sgd: bool = False,
    **settings: Any,
) -> tuple[dict[str, torch.Tensor] | None, list[float]]:
    """Train a fresh model one epoch; return (full state dict on rank 0 / None elsewhere, norms).

    `sgd=True` for bf16 comparisons: Adam turns rounding-sized gradient differences into lr-sized steps.
    """
    from distrib import distributed, prepare

    with distributed(strategy=strategy, **settings) as ctx:
        model = make_model() if model is None else model
        optimizer: torch.optim.Optimizer = (
            torch.optim.SGD(model.parameters(), lr=0.2)
            if sgd
            else torch.optim.AdamW(model.parameters(), lr=1e-2)
        )
        model, optimizer, loader = prepare(model, optimizer, make_loader(batch_size))
        norms = run_loop(model, optimizer, loader, clip=clip)
        return full_state(ctx, model), norms


def full_state(ctx: Any, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state on rank 0, through the strategy's own gathering."""
    from distrib import unwrap_model

    full = getattr(ctx.strategy_module, "full_state_dict", None)
    if ctx.strategy in ("fsdp", "deepspeed") and full is not None:
        return full(ctx, model)
    state = {k: v.detach().float().clone() for k, v in unwrap_model(model).state_dict().items()}
    return state if ctx.rank == 0 else None


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), f"different keys: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def changed_from_init(state: dict[str, torch.Tensor]) -> float:
    """How far training moved the parameters (guards against comparing two untrained models)."""
    return max_difference(state, {k: v.float() for k, v in make_model().state_dict().items()})


def build_deepspeed_ops() -> None:
    """Compile DeepSpeed's shared-memory communication op once, outside any rank's timeout.

    The first build on a machine runs g++ for 30 s to 3 min (cached in ~/.cache/torch_extensions);
    ranks that find it cached load it in about a second.
    """
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
