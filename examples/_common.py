"""Synthetic data and a small model shared by the feature examples (no downloads)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def classification_data(n: int, features: int = 20, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return TensorDataset(x, (x[:, : features // 2].sum(1) > 0).long())


def small_model(features: int = 20) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
