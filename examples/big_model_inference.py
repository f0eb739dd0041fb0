"""Big-model inference: run a model larger than the memory you give it, with part of it on disk.

The script trains nothing: it builds a small language model of about --size-mb MB, saves it as a sharded
safetensors checkpoint (as a hub download would give you), then loads it the big-model way with a RAM
budget of a third of its size, so that most layers live on disk, and checks the predictions against the
plain model.

    python examples/big_model_inference.py                 # 64 MB, a few seconds
    python examples/big_model_inference.py --size-mb 1500  # 1.5 GB model with a 500 MB budget
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from distrib import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

DIM, VOCAB = 512, 4096


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class LanguageModel(nn.Module):
    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(num_blocks))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most language models

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def save_sharded(model: nn.Module, folder: Path, shard_mb: int = 64) -> None:
    """Write a checkpoint the way the hub lays them out: shards plus model.safetensors.index.json."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, tensor in model.state_dict().items():
        if name == "head.weight":
            continue  # tied to embed.weight: stored once
        if sum(t.nbytes for t in shards[-1].values()) > shard_mb * 2**20:
            shards.append({})
        shards[-1][name] = tensor.contiguous()
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name))
        weight_map.update(dict.fromkeys(shard, file_name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=64, help="approximate model size in MB")
    args = parser.parse_args()
    block_mb = 8 * DIM * DIM * 4 / 2**20
    num_blocks = max(1, round((args.size_mb - VOCAB * DIM * 4 / 2**20) / block_mb))
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 32))

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, offload = Path(tmp) / "checkpoint", Path(tmp) / "offload"
        checkpoint.mkdir()
        plain = LanguageModel(num_blocks).eval()
        with torch.no_grad():
            expected = plain(tokens)
        save_sharded(plain, checkpoint)
        size = sum(p.nbytes for p in plain.parameters())
        del plain  # from here on, only the checkpoint

        with init_empty_weights():  # distrib: no memory allocated for the weights
            model = LanguageModel(num_blocks).eval()
        budget = {"cpu": size // 3}
        device_map = infer_auto_device_map(model, budget, no_split_module_classes=["Block"])  # distrib
        model = load_checkpoint_and_dispatch(  # distrib: streams each tensor to its place
            model, checkpoint, device_map=device_map, offload_folder=offload
        )
        with torch.no_grad():
            logits = model(tokens)  # disk layers are read just in time, then dropped
        copies = len(list(offload.glob("*.dat")))  # disk layers are read from the checkpoint itself
        flat = model.hf_device_map == device_map  # what transformers' generate() and pipelines read

    places = {
        device: sum(1 for d in device_map.values() if d == device) for device in set(device_map.values())
    }
    print(f"model: {size / 2**20:.0f} MiB in {num_blocks} blocks; RAM budget {budget['cpu'] / 2**20:.0f} MiB")
    print(
        f"device map: {len(device_map)} entries; per device: {places}; model.hf_device_map is the map: {flat}"
    )
    print(f"copies of weights in the offload folder: {copies} (disk layers are mapped from the checkpoint)")
    print(f"predictions agree: {bool(torch.equal(logits.argmax(-1), expected.argmax(-1)))}; "
          f"logits bit-identical: {torch.equal(logits, expected)}; "
          f"max |difference|: {(logits - expected).abs().max().item():.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
