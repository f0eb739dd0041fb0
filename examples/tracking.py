"""Log a tiny training run with distrib's trackers, logger and progress bar.

Run it as is, or on two processes:

    python examples/tracking.py
    torchrun --nproc-per-node 2 examples/tracking.py

Metrics land in runs/tracking-example/metrics.jsonl (one JSON object per logged step) and the
hyper-parameters in runs/tracking-example/config.json. Lines marked `# distrib` are the additions.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import distrib

logger = distrib.get_logger(__name__, log_level="INFO", rank_prefix=True)  # distrib


def make_data(num_rows: int = 512) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_rows, 8, generator=generator)
    y = x @ torch.arange(8.0) + 0.1 * torch.randn(num_rows, generator=generator)
    return TensorDataset(x, y)


def main() -> None:
    lr, batch_size, epochs = 0.05, 32, 3
    with distrib.distributed(seed=0):  # distrib
        model = torch.nn.Linear(8, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        loader = DataLoader(make_data(), batch_size=batch_size, shuffle=True)
        model, optimizer, loader = distrib.prepare(model, optimizer, loader)  # distrib
        config = {"lr": lr, "batch_size": batch_size, "epochs": epochs}
        distrib.init_trackers("tracking-example", config=config)  # distrib: JSON lines under runs/

        step = 0
        for epoch in range(epochs):
            for x, y in distrib.progress_bar(loader, desc=f"epoch {epoch}"):  # distrib
                loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
                distrib.backward(loss)  # distrib
                optimizer.step()
                optimizer.zero_grad()
                mean_loss = distrib.reduce(loss.detach(), "mean")  # distrib: the loss of all ranks
                distrib.log({"loss": mean_loss, "epoch": epoch}, step=step)  # distrib
                step += 1
            logger.info("epoch %d done, loss %.4f", epoch, mean_loss.item())  # distrib: once
        logger.info("processed %d steps", step, main_process_only=False)  # distrib: every rank
        distrib.end_training()  # distrib


if __name__ == "__main__":
    import logging

    logging.basicConfig(format="%(message)s")
    main()
