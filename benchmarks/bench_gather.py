"""Distributed evaluation on 2 processes: forward + gather of predictions and labels for every batch,
on a dataset whose size divides neither the world size nor the batch size.

Variants: a hand-written loop (DistributedSampler, which pads by repeating samples; `dist.all_gather` of
predictions and of labels per batch; the padding cut off at the end), distrib's `gather_for_metrics`, and
Accelerate's. Every variant evaluates the same DDP-wrapped model. A round is one evaluation pass, timed
per batch; every variant's pass returns exactly `len(dataset)` predictions (checked).

    python benchmarks/bench_gather.py --json gather.json [--quick] [--launches 5]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _common
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

GOAL = {"variant": "distrib", "max_ratio": 1.10}
FEATURES, CLASSES = 64, 10


def build(samples: int) -> tuple[torch.nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 256), torch.nn.ReLU(), torch.nn.Linear(256, CLASSES)
    ).eval()
    data = TensorDataset(torch.randn(samples, FEATURES), torch.randint(0, CLASSES, (samples,)))
    return model, data


def timed_pass(evaluate: Any, loader: Any, expected: int) -> Any:
    def run() -> int:
        with torch.no_grad():
            preds, labels = evaluate()
        assert len(preds) == len(labels) == expected, (len(preds), expected)
        return len(loader)

    return run


def raw_variant(config: dict[str, Any], world: int, rank: int) -> Any:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    model, data = build(config["samples"])
    model = DistributedDataParallel(model)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=config["batch"], sampler=sampler)

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        preds, labels = [], []
        for x, y in loader:
            preds.append(all_gather(model(x).argmax(-1)))
            labels.append(all_gather(y))
        return torch.cat(preds)[: len(data)], torch.cat(labels)[: len(data)]

    return timed_pass(evaluate, loader, len(data))


def prepared_variant(config: dict[str, Any], gather_for_metrics: Any, prepare: Any) -> Any:
    model, data = build(config["samples"])
    model, loader = prepare(model, DataLoader(data, batch_size=config["batch"]))

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        preds, labels = [], []
        for x, y in loader:
            p, t = gather_for_metrics((model(x).argmax(-1), y))
            preds.append(p)
            labels.append(t)
        return torch.cat(preds), torch.cat(labels)

    return timed_pass(evaluate, loader, len(data))


def variant(name: str, config: dict[str, Any], world: int, rank: int) -> Any:
    if name == "raw":
        return raw_variant(config, world, rank)
    if name == "distrib":
        from distrib import gather_for_metrics, prepare

        return prepared_variant(config, gather_for_metrics, prepare)
    from accelerate import Accelerator

    accelerator = Accelerator()
    return prepared_variant(config, accelerator.gather_for_metrics, accelerator.prepare)


def worker(launch: dict[str, Any]) -> None:
    from distrib import distributed

    times = {}
    with distributed() as ctx:
        for config in launch["cases"]:
            runs = {n: variant(n, config, ctx.world_size, ctx.rank) for n in config["variants"]}
            times[config["case"]] = _common.interleave(runs, config["rounds"], warmup=1, barrier=dist.barrier)
        _common.emit({"times": times})


def configs(args: Any) -> list[list[dict[str, Any]]]:
    samples, rounds = (301, 2) if args.quick else (2001, 30)
    return [
        [
            {
                "case": f"batch {batch}",
                "describe": f"MLP {FEATURES}-256-{CLASSES}, {samples} samples, batch {batch} per rank",
                "samples": samples,
                "batch": batch,
                "rounds": rounds,
                "variants": _common.variants_wanted(args),
            }
            for batch in (16, 64)
        ]
    ]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = _common.parser(__doc__ or "").parse_args(argv)
    if args.worker:
        _common.run_worker(args, worker)
        return None
    cases = _common.run_cases(Path(__file__), args, configs(args), default_launches=5)
    return _common.finish(
        "gather",
        args,
        {
            "title": "gather_for_metrics in an evaluation pass",
            "unit": "µs per batch",
            "goal": GOAL,
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
