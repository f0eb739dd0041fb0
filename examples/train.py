"""The main example: a plain PyTorch training loop; the lines marked `# distrib` are all it adds.

python examples/train.py                               # one process
distrib launch --num-processes 2 examples/train.py     # two CPU processes (gloo)
torchrun --nproc-per-node 2 examples/train.py          # the same, with torchrun
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import distrib  # distrib
from distrib import backward, distributed, gather_for_metrics, prepare  # distrib


def make_data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :10].sum(1) > 0).long()
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    with distributed(seed=0) as ctx:  # distrib
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train = DataLoader(make_data(2048), batch_size=args.batch_size, shuffle=True)
        val = DataLoader(make_data(500), batch_size=64)
        model, optimizer, train, val = prepare(model, optimizer, train, val)  # distrib

        for epoch in range(args.epochs):
            model.train()
            for x, y in train:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                backward(loss)  # distrib (instead of loss.backward())
                optimizer.step()
                optimizer.zero_grad()
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in val:
                    preds, labels = gather_for_metrics((model(x).argmax(-1), y))  # distrib
                    correct += int((preds == labels).sum())
                    total += len(labels)
            distrib.print(
                f"epoch {epoch}: loss {loss.item():.4f}, accuracy {correct / total:.3f} on {total} samples"
            )  # distrib
        distrib.print(f"done on {ctx.world_size} process(es), device {ctx.device}")


if __name__ == "__main__":
    main()
