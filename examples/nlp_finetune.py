"""Fine-tune a Hugging Face transformers model: sequence classification with gradient accumulation and
distributed evaluation. Offline: the model is built from a tiny BertConfig (no hub download) and the data
is synthetic, already tokenised text (a sentence is "positive" when it contains the token 7 more often
than the token 8).

distrib launch --num-processes 2 examples/nlp_finetune.py
distrib launch --num-processes 2 --mixed-precision bf16 examples/nlp_finetune.py --epochs 1
python examples/nlp_finetune.py                                 # one process

The loop is the one you would write for a single GPU; the lines marked `# distrib` are all it adds. For a
real checkpoint use `AutoModelForSequenceClassification.from_pretrained(name)` inside
`main_process_first()`, so that only one process downloads it.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import DataLoader, Dataset

import distrib  # distrib
from distrib import accumulate, backward, distributed, gather_for_metrics, prepare  # distrib

try:
    from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup
except ImportError:
    BertConfig = None

VOCAB, LENGTH = 512, 32


class TokenisedSentences(Dataset):
    """What a tokenizer gives you: input_ids, attention_mask (with padding) and a label per sample."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(10, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=g)
        self.attention_mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        marks = torch.randint(0, 4, (n, LENGTH), generator=g)
        self.input_ids[marks == 0] = 7
        self.input_ids[marks == 1] = 8
        self.input_ids[self.attention_mask == 0] = 0  # [PAD]
        counts = [((self.input_ids == t) & (self.attention_mask == 1)).sum(1) for t in (7, 8)]
        self.labels = (counts[0] > counts[1]).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


def tiny_bert() -> torch.nn.Module:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=LENGTH, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def evaluate(model: torch.nn.Module, loader: DataLoader) -> tuple[float, int]:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(**batch).logits
            preds, labels = gather_for_metrics((logits.argmax(-1), batch["labels"]))  # distrib
            correct += int((preds == labels).sum())
            total += len(labels)
    model.train()
    return correct / total, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accumulation-steps", type=int, default=2)
    args = parser.parse_args()
    if BertConfig is None:
        print("this example needs transformers: pip install transformers")
        sys.exit(0)

    with distributed(gradient_accumulation_steps=args.accumulation_steps, seed=0) as ctx:  # distrib
        model = tiny_bert()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        train = DataLoader(TokenisedSentences(1024, seed=0), batch_size=args.batch_size, shuffle=True)
        val = DataLoader(TokenisedSentences(301, seed=1), batch_size=32)  # 301: not a multiple of anything
        model, optimizer, train, val = prepare(model, optimizer, train, val)  # distrib
        steps = args.epochs * len(train) // args.accumulation_steps  # optimizer steps, not micro-batches
        scheduler = prepare(get_linear_schedule_with_warmup(optimizer, steps // 10, steps))  # distrib

        for epoch in range(args.epochs):
            for batch in train:
                with accumulate(model):  # distrib: gradients are synchronised once per window
                    loss = model(**batch).loss
                    backward(loss)  # distrib (instead of loss.backward())
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            accuracy, total = evaluate(model, val)
            distrib.print(
                f"epoch {epoch}: loss {loss.item():.4f}, accuracy {accuracy:.3f} on {total} samples"
            )
        distrib.print(f"done on {ctx.world_size} process(es), mixed precision: {ctx.mixed_precision}")


if __name__ == "__main__":
    main()
