"""Image classification: a small CNN on synthetic 32x32 RGB images, with augmentation, a learning-rate
schedule, gradient clipping and distributed evaluation. No download: class k is a bright square at one of
four places, on noise.

distrib launch --num-processes 2 examples/image_classifier.py
distrib launch --num-processes 2 --mixed-precision bf16 examples/image_classifier.py --epochs 2
python examples/image_classifier.py                                 # one process
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import distrib  # distrib
from distrib import backward, clip_grad_norm_, distributed, gather_for_metrics, prepare  # distrib

CLASSES = 4


class SquareImages(Dataset):
    """Noise images with a bright 8x8 square whose position gives the class; random flips when training."""

    def __init__(self, n: int, seed: int, train: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        for i, label in enumerate(self.labels.tolist()):
            row, col = divmod(label, 2)
            self.images[i, :, 4 + 16 * row : 12 + 16 * row, 4 + 16 * col : 12 + 16 * col] += 0.4
        self.train = train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.train and torch.rand(()) < 0.5:
            image = image + 0.1 * torch.randn_like(image)  # an augmentation that keeps the label true
        return image, self.labels[i]


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        block(3, 16), block(16, 32), block(32, 32), nn.Flatten(), nn.Linear(32 * 4 * 4, CLASSES)
    )


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, int]:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            preds, labels = gather_for_metrics((model(images).argmax(-1), labels))  # distrib
            correct += int((preds == labels).sum())
            total += len(labels)
    model.train()
    return correct / total, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    with distributed(seed=0) as ctx:  # distrib
        model = small_cnn()
        if ctx.device.type == "cuda" and ctx.world_size > 1:  # batch statistics over all GPUs (not on CPU)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        train = DataLoader(SquareImages(1024, seed=0, train=True), batch_size=args.batch_size, shuffle=True)
        val = DataLoader(SquareImages(250, seed=1, train=False), batch_size=64)
        model, optimizer, train, val = prepare(model, optimizer, train, val)  # distrib
        scheduler = prepare(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(train)))

        for epoch in range(args.epochs):
            for images, labels in train:
                loss = nn.functional.cross_entropy(model(images), labels)
                backward(loss)  # distrib (instead of loss.backward())
                clip_grad_norm_(model.parameters(), max_norm=2.0)  # distrib: the global norm over ranks
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            accuracy, total = evaluate(model, val)
            distrib.print(f"epoch {epoch}: loss {loss.item():.4f}, accuracy {accuracy:.3f} on {total} images")
        distrib.print(f"done on {ctx.world_size} process(es), device {ctx.device}")


if __name__ == "__main__":
    main()
