"""Mixed precision: bf16 autocast on CPU and GPU (fp16 with loss scaling on GPUs) with one setting.

distrib launch --num-processes 2 --mixed-precision bf16 examples/mixed_precision.py
"""

from __future__ import annotations

import torch
from _common import classification_data, small_model
from torch.utils.data import DataLoader

import distrib
from distrib import backward, clip_grad_norm_, distributed, optimizer_step_was_skipped, prepare


def main() -> None:
    with distributed(mixed_precision="bf16", seed=0) as ctx:  # distrib: the launcher flag works too
        model = small_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        loader = DataLoader(classification_data(1024), batch_size=32, shuffle=True)
        model, optimizer, loader = prepare(model, optimizer, loader)
        for x, y in loader:
            logits = model(x)  # runs under autocast; comes back in float32
            loss = torch.nn.functional.cross_entropy(logits, y)
            backward(loss)  # scales the loss under fp16
            clip_grad_norm_(model.parameters(), 1.0)  # un-scales first under fp16
            optimizer.step()
            optimizer.zero_grad()
        distrib.print(f"{ctx.mixed_precision}: final loss {loss.item():.4f}, logits dtype {logits.dtype}, "
                      f"last step skipped: {optimizer_step_was_skipped()}")  # fmt: skip


if __name__ == "__main__":
    main()
