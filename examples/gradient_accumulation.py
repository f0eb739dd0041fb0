"""Gradient accumulation: one setting and one `with accumulate(model):` block.

distrib launch --num-processes 2 examples/gradient_accumulation.py
"""

from __future__ import annotations

import torch
from _common import classification_data, small_model
from torch.utils.data import DataLoader

import distrib
from distrib import accumulate, backward, distributed_main, prepare


@distributed_main(gradient_accumulation_steps=4, seed=0)  # distrib: 4 micro-batches per optimizer step
def main(ctx):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(classification_data(1024), batch_size=8, shuffle=True)
    model, optimizer, loader = prepare(model, optimizer, loader)
    # write schedules in optimizer steps: batches per rank / accumulation steps
    steps_per_epoch = len(loader) // ctx.gradient_accumulation_steps
    scheduler = prepare(
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=2 * steps_per_epoch)
    )
    optimizer_steps = 0
    for _ in range(2):
        for x, y in loader:
            with accumulate(model):  # distrib: no gradient all-reduce until the window closes
                backward(torch.nn.functional.cross_entropy(model(x), y))
                optimizer.step()  # acts only when the window closes
                scheduler.step()
                optimizer.zero_grad()
                optimizer_steps += ctx.sync_gradients
    distrib.print(f"{optimizer_steps} optimizer steps over {2 * len(loader)} micro-batches per rank")


if __name__ == "__main__":
    main()
