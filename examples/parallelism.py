"""N-D parallelism: the same loop with tensor parallel, a pipeline, or both with FSDP2 on the data dimension.

distrib launch --num-processes 2 --cpu examples/parallelism.py                  # tensor parallel, tp=2
distrib launch --num-processes 2 --cpu examples/parallelism.py --layout pp      # 2 pipeline stages
distrib launch --num-processes 4 --cpu examples/parallelism.py --layout fsdp-tp # FSDP2 x TP, 2 x 2

The lines marked `# distrib` are all the parallelism adds; a pipelined model runs forward and backward in
one call (`model(x, target=y, loss_fn=...)`), which is the one line that differs.
"""

from __future__ import annotations

import argparse

import torch
from _common import classification_data
from torch import nn
from torch.utils.data import DataLoader

import distrib  # distrib
from distrib import (
    ParallelismOptions,
    backward,
    clip_grad_norm_,
    distributed,
    gather_for_metrics,
    prepare,
)  # distrib

# how each block is split over the tensor-parallel ranks: column-wise, then row-wise
TP_PLAN = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}  # distrib
LAYOUTS = {  # distrib
    "tp": ("ddp", ParallelismOptions(tp=2, tp_plan=TP_PLAN)),
    "pp": ("ddp", ParallelismOptions(pp=2, pp_schedule="1f1b", pp_microbatches=4)),
    "fsdp-tp": ("fsdp", ParallelismOptions(dp_shard=-1, tp=2, tp_plan=TP_PLAN)),
}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, features: int = 20, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tp")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    strategy, parallelism = LAYOUTS[args.layout]
    loss_fn = nn.functional.cross_entropy

    with distributed(strategy=strategy, parallelism=parallelism, seed=0) as ctx:  # distrib
        model = Net()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        train = DataLoader(classification_data(1024), batch_size=32, shuffle=True, drop_last=True)
        val = DataLoader(classification_data(300, seed=1), batch_size=60)
        model, optimizer, train, val = prepare(model, optimizer, train, val)  # distrib
        pipelined = ctx.pp_size > 1  # distrib

        for epoch in range(args.epochs):
            model.train()
            for x, y in train:
                # distrib: a pipelined model's call runs forward and backward of every micro-batch
                loss = model(x, target=y, loss_fn=loss_fn) if pipelined else loss_fn(model(x), y)
                backward(loss)  # distrib (does nothing after a pipeline step)
                clip_grad_norm_(model.parameters(), 1.0)  # distrib: the norm over every shard and stage
                optimizer.step()
                optimizer.zero_grad()
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in val:
                    preds, labels = gather_for_metrics((model(x).argmax(-1), y))  # distrib
                    correct += int((preds == labels).sum())
                    total += len(labels)
            distrib.print(f"epoch {epoch}: loss {loss.item():.4f}, accuracy {correct / total:.3f} on {total}")
        distrib.print(
            f"done: layout {args.layout}, mesh {dict(zip(ctx.mesh.mesh_dim_names, ctx.mesh.shape))}"
            if ctx.mesh is not None
            else "done on one process (every size is 1)"
        )


if __name__ == "__main__":
    main()
