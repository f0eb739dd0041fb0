"""Prepared-dataloader overhead per batch on 2 processes: DataLoader + DistributedSampler + .to(device)
vs distrib's prepared loader vs Accelerate's.

Cases: a TensorDataset (the cheapest possible batches, so any per-batch overhead shows) and a map-style
dataset of tokenised samples (dicts of tensors, collated by torch's default collate). A round is one
epoch; the loop body only touches the batch.

    python benchmarks/bench_dataloader.py --json dataloader.json [--quick] [--launches 5]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _common
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

GOAL = {"variant": "distrib", "max_ratio": 1.05}
DEVICE = torch.device("cpu")


class TokenisedSamples(Dataset):  # type: ignore[type-arg]
    """Samples shaped like a tokenised text dataset: input_ids, attention_mask, label."""

    def __init__(self, n: int, length: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 30000, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.int64)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def dataset(kind: str, n: int) -> Dataset:  # type: ignore[type-arg]
    if kind == "tensor":
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 2, (n,), generator=g))
    return TokenisedSamples(n)


def touch(batch: Any) -> int:
    values = batch.values() if isinstance(batch, dict) else batch
    return sum(int(t.shape[0]) for t in values)


def timed_epochs(loader: Any, before_epoch: Any = None, move: bool = False) -> Any:
    epoch = [0]

    def run() -> int:
        if before_epoch is not None:
            before_epoch(epoch[0])
        epoch[0] += 1
        n = 0
        for batch in loader:
            if move:  # the hand-written loop moves each batch itself
                batch = (
                    {k: v.to(DEVICE) for k, v in batch.items()}
                    if isinstance(batch, dict)
                    else [t.to(DEVICE) for t in batch]
                )
            touch(batch)
            n += 1
        return n

    return run


def build(name: str, data: Dataset, batch: int, world: int, rank: int) -> Any:  # type: ignore[type-arg]
    if name == "raw":
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        return timed_epochs(DataLoader(data, batch_size=batch, sampler=sampler), sampler.set_epoch, True)
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    if name == "distrib":
        from distrib import prepare

        return timed_epochs(prepare(loader))
    from accelerate import Accelerator

    return timed_epochs(Accelerator().prepare(loader))


def worker(launch: dict[str, Any]) -> None:
    import torch.distributed as dist

    from distrib import distributed

    times = {}
    with distributed() as ctx:
        for config in launch["cases"]:
            data = dataset(config["dataset"], config["samples"] * ctx.world_size)
            runs = {n: build(n, data, config["batch"], ctx.world_size, ctx.rank) for n in config["variants"]}
            times[config["case"]] = _common.interleave(runs, config["rounds"], warmup=1, barrier=dist.barrier)
        _common.emit({"times": times})


def configs(args: Any) -> list[list[dict[str, Any]]]:
    batches, rounds = (20, 2) if args.quick else (200, 30)
    return [
        [
            {
                "case": kind,
                "describe": f"{kind} dataset: batch 32 per rank, {batches} batches per round",
                "dataset": kind,
                "samples": batches * 32,
                "batch": 32,
                "rounds": rounds,
                "variants": _common.variants_wanted(args),
            }
            for kind in ("tensor", "tokenised")
        ]
    ]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = _common.parser(__doc__ or "").parse_args(argv)
    if args.worker:
        _common.run_worker(args, worker)
        return None
    cases = _common.run_cases(Path(__file__), args, configs(args), default_launches=5)
    return _common.finish(
        "dataloader",
        args,
        {"title": "Prepared dataloader overhead", "unit": "µs per batch", "goal": GOAL, "cases": cases},
    )


if __name__ == "__main__":
    main()
