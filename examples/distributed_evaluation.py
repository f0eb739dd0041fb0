"""Distributed evaluation: every rank evaluates a shard; gather_for_metrics returns exactly the dataset.

distrib launch --num-processes 2 examples/distributed_evaluation.py
"""

from __future__ import annotations

import torch
from _common import classification_data, small_model
from torch.utils.data import DataLoader

import distrib
from distrib import distributed, gather_for_metrics, prepare


def main() -> None:
    with distributed() as ctx:
        dataset = classification_data(1001)  # not a multiple of the world size or batch size
        model, loader = prepare(small_model(), DataLoader(dataset, batch_size=64))
        predictions, labels, ids = [], [], []
        model.eval()
        with torch.no_grad():
            for x, y in loader:
                p, t = gather_for_metrics((model(x).argmax(-1), y))  # drops the padding of the last batch
                predictions.append(p)
                labels.append(t)
                ids += gather_for_metrics([f"id-{i}" for i in range(len(y))])  # any objects work too
        preds, truth = torch.cat(predictions), torch.cat(labels)
        distrib.print(f"{len(preds)} predictions for {len(dataset)} samples on {ctx.world_size} process(es); "
                      f"accuracy {(preds == truth).float().mean():.3f}")  # fmt: skip
        assert len(preds) == len(dataset) == len(ids)


if __name__ == "__main__":
    main()
