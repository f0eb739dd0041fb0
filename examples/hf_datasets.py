"""Hugging Face `datasets` with distrib: build a Dataset in memory (no download), tokenise it with
`.map()`, hand it to a plain DataLoader, and let `prepare` shard it. Evaluation gathers the predictions
of every process, in dataset order, with the padding of the last batch removed.

distrib launch --num-processes 2 examples/hf_datasets.py
python examples/hf_datasets.py                       # one process

Needs `pip install datasets`; without it the script says so and exits.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

import distrib  # distrib
from distrib import backward, distributed, gather_for_metrics, main_process_first, prepare  # distrib

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "a", "movie", "plot", "was", "very"]
LENGTH = 12


def raw_reviews(n: int, seed: int) -> dict[str, list]:
    """Short synthetic reviews; the label says whether positive words outnumber negative ones."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, LENGTH))]
        score = sum(w in WORDS[:3] for w in words) - sum(w in WORDS[3:6] for w in words)
        texts.append(" ".join(words))
        labels.append(int(score > 0))
    return {"text": texts, "label": labels}


def tokenise(batch: dict[str, list]) -> dict[str, list]:
    """A stand-in for a tokenizer: word ids (0 = padding), padded to LENGTH."""
    ids = [[WORDS.index(w) + 1 for w in text.split()][:LENGTH] for text in batch["text"]]
    return {"input_ids": [row + [0] * (LENGTH - len(row)) for row in ids]}


class BagOfWords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(len(WORDS) + 1, 32, padding_idx=0)
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def load(datasets_module, n: int, seed: int, batch_size: int, shuffle: bool) -> DataLoader:
    with main_process_first():  # distrib: with a cache on disk, rank 0 builds it and the others reuse it
        data = datasets_module.Dataset.from_dict(raw_reviews(n, seed))
        data = data.map(tokenise, batched=True, remove_columns=["text"])
    data.set_format("torch")  # rows come out as dicts of tensors
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    try:
        import datasets
    except ImportError:
        print("this example needs Hugging Face datasets: pip install datasets")
        sys.exit(0)
    datasets.disable_progress_bars()

    with distributed(seed=0) as ctx:  # distrib
        train = load(datasets, 2000, seed=0, batch_size=32, shuffle=True)
        val = load(datasets, 333, seed=1, batch_size=50, shuffle=False)
        model = BagOfWords()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model, optimizer, train, val = prepare(model, optimizer, train, val)  # distrib

        for epoch in range(args.epochs):
            for batch in train:
                loss = nn.functional.cross_entropy(model(batch["input_ids"]), batch["label"])
                backward(loss)  # distrib (instead of loss.backward())
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():
                results = [gather_for_metrics((model(b["input_ids"]).argmax(-1), b["label"])) for b in val]
            preds, labels = (torch.cat(column) for column in zip(*results))
            accuracy = (preds == labels).float().mean().item()
            distrib.print(
                f"epoch {epoch}: loss {loss.item():.4f}, accuracy {accuracy:.3f} on {len(labels)} reviews"
            )
        distrib.print(f"done on {ctx.world_size} process(es); datasets {datasets.__version__}")


if __name__ == "__main__":
    main()
