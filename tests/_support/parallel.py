"""Shared pieces of the N-D parallelism tests: a small model that tensor parallel and pipelines can split,
its data, and one training loop written once for every layout (pipelined or not)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WIDTH = 8
NUM_CLASSES = 4
NUM_SAMPLES = 32
#: the tensor-parallel plan of `BlockNet`: each block's MLP is split column- then row-wise
PLAN = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class BlockNet(nn.Module):
    """Embedding, a stack of residual MLP blocks, a final norm and a head: shaped like a transformer."""

    def __init__(self, num_blocks: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList([Block() for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model(seed: int = 0) -> BlockNet:
    torch.manual_seed(seed)
    return BlockNet()


def make_loader(batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, WIDTH, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


def run_epoch(
    model: Any, optimizer: Any, loader: Any, *, pipelined: bool, clip: float | None = None
) -> list[float]:
    """One epoch of the user's loop; returns the mean loss of each step over the data-parallel ranks."""
    from distrib import accumulate, backward, clip_grad_norm_, current, reduce

    losses = []
    for x, y in loader:
        with accumulate(model):
            loss = model(x, target=y, loss_fn=loss_fn) if pipelined else loss_fn(model(x), y)
            backward(loss)
            if clip is not None and current().sync_gradients:
                clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(float(reduce(loss.detach(), "mean")))
    return losses


def train(
    *,
    batch_size: int = 4,
    epochs: int = 1,
    clip: float | None = 0.5,
    save_to: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train a fresh `BlockNet`; return the whole model's state (rank 0), the losses and the mesh ranks."""
    from distrib import distributed, prepare, save_model, save_state

    with distributed(**settings) as ctx:
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer, loader = prepare(model, optimizer, make_loader(batch_size))
        pipelined = ctx.pp_size > 1
        losses = [
            loss
            for _ in range(epochs)
            for loss in run_epoch(model, optimizer, loader, pipelined=pipelined, clip=clip)
        ]
        full = ctx.strategy_module.full_state_dict(ctx, model)
        if save_to is not None:
            save_state(save_to)
            save_model(model, save_to + "-model")
        ranks = {name: getattr(ctx, f"{name}_rank") for name in ("dp", "tp", "pp", "cp")}
        return {"state": full if ctx.rank == 0 else None, "losses": losses, "ranks": ranks}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), f"different keys: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def moved(state: dict[str, torch.Tensor]) -> float:
    """How far training moved the parameters from their initial values (guards against no-op runs)."""
    return max_difference(state, {k: v.float() for k, v in make_model().state_dict().items()})
