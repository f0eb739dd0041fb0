"""Distributed evaluation on 2 processes: forward + gather for every batch, on a dataset whose size
divides neither the world size nor the batch size.

Cases: "tuple" gathers predictions and labels (two tensors) per batch, "single" gathers the logits (one
`[batch, 10]` tensor) per batch. Variants: a hand-written loop (DistributedSampler, which pads by
repeating samples; one `dist.all_gather` per tensor per batch; the padding cut off at the end),
distrib's `gather_for_metrics` (checked: the ranks agree on op, call site, shapes and dtypes inside the
same all-gather), distrib in debug mode (`debug_collectives=True`: a separate header exchange before
every collective) and Accelerate's. Every variant evaluates the same DDP-wrapped model. A round is one
evaluation pass, timed per batch; every variant's pass returns exactly `len(dataset)` results (checked).

    python benchmarks/bench_gather.py --json gather.json [--quick] [--launches 5] [--no-accelerate]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _common
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

GOAL = {"variant": "distrib", "max_ratio": 1.05}
FEATURES, CLASSES = 64, 10


def build(samples: int) -> tuple[torch.nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 256), torch.nn.ReLU(), torch.nn.Linear(256, CLASSES)
    ).eval()
    data = TensorDataset(torch.randn(samples, FEATURES), torch.randint(0, CLASSES, (samples,)))
    return model, data


def timed_pass(evaluate: Any, loader: Any, expected: int, config: dict[str, Any]) -> Any:
    def run() -> int:
        with torch.no_grad():
            preds, labels = evaluate()
        if config["gathered"] == "single":  # labels stay local in this case
            assert len(preds) == expected, (len(preds), expected)
        else:
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
            if config["gathered"] == "single":
                preds.append(all_gather(model(x)))
                labels.append(y)  # kept locally: the single case gathers one tensor per batch
                continue
            preds.append(all_gather(model(x).argmax(-1)))
            labels.append(all_gather(y))
        return torch.cat(preds)[: len(data)], torch.cat(labels)[: len(data)]

    return timed_pass(evaluate, loader, len(data), config)


def prepared_variant(config: dict[str, Any], gather_for_metrics: Any, prepare: Any) -> Any:
    model, data = build(config["samples"])
    model, loader = prepare(model, DataLoader(data, batch_size=config["batch"]))

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        preds, labels = [], []
        for x, y in loader:
            if config["gathered"] == "single":
                preds.append(gather_for_metrics(model(x)))
                labels.append(y)
                continue
            p, t = gather_for_metrics((model(x).argmax(-1), y))
            preds.append(p)
            labels.append(t)
        return torch.cat(preds), torch.cat(labels)

    return timed_pass(evaluate, loader, len(data), config)


def debug_variant(config: dict[str, Any]) -> Any:
    """distrib with `debug_collectives=True`'s cost on distrib's own collectives: a header exchange before
    each. (Set on the open scope's ledger, so the hand-written variant's calls are not wrapped too.)"""
    from distrib import current, gather_for_metrics, prepare

    run = prepared_variant(config, gather_for_metrics, prepare)
    ledger = current().state.extensions["ledger"]

    def debug_run() -> int:
        ledger.debug = True
        try:
            return int(run())
        finally:
            ledger.debug = False

    return debug_run


def variant(name: str, config: dict[str, Any], world: int, rank: int) -> Any:
    if name == "raw":
        return raw_variant(config, world, rank)
    if name == "distrib":
        from distrib import gather_for_metrics, prepare

        return prepared_variant(config, gather_for_metrics, prepare)
    if name == "distrib_debug":
        return debug_variant(config)
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
    variants = _common.variants_wanted(args)
    variants.insert(2, "distrib_debug")
    cases = [("tuple", 16), ("tuple", 64), ("single", 64)]
    return [
        [
            {
                "case": f"{gathered}, batch {batch}",
                "describe": f"MLP {FEATURES}-256-{CLASSES}, {samples} samples, batch {batch} per rank, gathering "
                + ("predictions and labels" if gathered == "tuple" else f"the [{batch}, {CLASSES}] logits"),
                "samples": samples,
                "batch": batch,
                "gathered": gathered,
                "rounds": rounds,
                "variants": variants,
            }
            for gathered, batch in cases
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
