"""A small language-model-shaped network and checkpoints of it in every layout, for big-model tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from distrib import (
    init_empty_weights,
)

DISK_MAP = {
    "embed": "cpu",
    "blocks.0": "cpu",
    "blocks.1": "disk",
    "blocks.2": "disk",
    "blocks.3": "cpu",
    "head": "cpu",
    "scale": "cpu",
}


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    """A small language-model shape: embedding, blocks, head tied to the embedding, a float buffer."""

    def __init__(self, dim: int = 32, num_blocks: int = 4, vocab: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(num_blocks))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.scale


def state_without_ties(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["head.weight"]  # tied to embed.weight; safetensors files hold it once
    return state


def save_sharded(state: dict[str, torch.Tensor], folder: Path, num_shards: int = 3) -> None:
    names = list(state)
    weight_map = {}
    for index in range(num_shards):
        file_name = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: state[name] for name in names[index::num_shards]}
        save_file(part, folder / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def make_reference() -> tuple[Net, torch.Tensor, torch.Tensor]:
    """The network with seeded weights, a batch of token ids and its outputs."""
    torch.manual_seed(0)
    model = Net().eval()
    ids = torch.randint(0, 64, (3, 11))
    with torch.no_grad():
        expected = model(ids)
    return model, ids, expected


def make_checkpoints(root: Path, model: Net) -> dict[str, Path]:
    """The model saved as one safetensors file, as sharded safetensors with an index, and as a .bin."""
    single = root / "model.safetensors"
    save_file(state_without_ties(model), single)
    sharded = root / "sharded"
    sharded.mkdir()
    save_sharded(state_without_ties(model), sharded)
    torch_file = root / "pytorch_model.bin"
    torch.save(model.state_dict(), torch_file)
    return {"single": single, "sharded": sharded, "bin": torch_file}


def empty_net() -> Net:
    with init_empty_weights():
        return Net().eval()


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _copy(model: nn.Module) -> Net:
    copy = Net().eval()
    copy.load_state_dict(model.state_dict())
    return copy
