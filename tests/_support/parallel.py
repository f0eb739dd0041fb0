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
    save_after_first: str | None = None,
    load_from: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train a fresh `BlockNet` for some epochs; return the whole model's state (rank 0), every step's loss,
    this rank's place in the mesh and, with `save_after_first`, the state saved after the first epoch
    (`save_state` there, `save_model` to `<dir>-model`). `load_from` resumes from a checkpoint first."""
    from distrib import distributed, load_state, prepare, save_model, save_state

    with distributed(**settings) as ctx:
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer, loader = prepare(model, optimizer, make_loader(batch_size))
        if load_from is not None:
            load_state(load_from)
        pipelined, losses, saved = ctx.pp_size > 1, [], None
        for epoch in range(epochs):
            losses += run_epoch(model, optimizer, loader, pipelined=pipelined, clip=clip)
            if epoch == 0 and save_after_first is not None:
                save_state(save_after_first)
                save_model(model, save_after_first + "-model")
                saved = ctx.strategy_module.full_state_dict(ctx, model)
        full = ctx.strategy_module.full_state_dict(ctx, model)
        ranks = {name: getattr(ctx, f"{name}_rank") for name in ("dp", "tp", "pp", "cp")}
        first = ctx.rank == 0
        return {"state": full if first else None, "saved": saved if first else None, "losses": losses,
                "ranks": ranks}  # fmt: skip


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), f"different keys: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def moved(state: dict[str, torch.Tensor]) -> float:
    """How far training moved the parameters from their initial values (guards against no-op runs)."""
    return max_difference(state, {k: v.float() for k, v in make_model().state_dict().items()})


def in_one_group(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` in a gloo group this worker opens, so that its several scopes reuse one group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        result = fn(*args, **kwargs)
        dist.barrier()  # not after a failure: the rank must report it, not wait for the others
        return result
    finally:
        dist.destroy_process_group()
