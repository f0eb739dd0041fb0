"""Training-step overhead on 2 processes over gloo: raw DDP loop vs distrib vs Accelerate.

Cases: a tiny MLP (the step is cheap, so per-step Python overhead shows) and a small transformer, each
plain, with gradient accumulation (4 micro-batches), with bf16 autocast, and "logging": every step also
averages the loss over the ranks for logging (`dist.all_reduce` by hand, `distrib.reduce`, which goes
through the collective ledger and its cross-rank check, and `accelerator.reduce`). The "logging" cases
also time distrib with the straggler report on (`straggler_report_every=100`: each fetch and backward
timed, one small all-gather every 100 steps). A round is one epoch of the prepared (or hand-sharded)
dataloader, timed per micro-batch (wall and CPU time): loading, forward, backward, optimizer.

    python benchmarks/bench_step.py --json step.json [--quick] [--launches 5] [--no-accelerate]
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import _common
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

GOAL = {"variant": "distrib", "max_ratio": 1.02}
ACCUMULATION = 4
# per model: (samples per rank per round, batch size per rank, timed rounds)
SIZES = {"mlp": (64 * 32, 32, 30), "transformer": (16 * 16, 16, 20)}
QUICK_SIZES = {"mlp": (8 * 32, 32, 2), "transformer": (4 * 16, 16, 2)}
MODES = {"plain": ("no", 1), "accumulation": ("no", ACCUMULATION), "bf16": ("bf16", 1), "logging": ("no", 1)}


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=128, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def build(kind: str, samples: int) -> tuple[torch.nn.Module, TensorDataset]:
    """The same model and data for every variant (seeded)."""
    torch.manual_seed(0)
    if kind == "mlp":
        model: torch.nn.Module = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 4),
        )  # fmt: skip
        x = torch.randn(samples, 32)
    else:
        model = TinyTransformer()
        x = torch.randint(0, 256, (samples, 32))
    return model, TensorDataset(x, torch.randint(0, 4, (samples,)))


def raw_variant(config: dict[str, Any], world: int, rank: int) -> Any:
    """The hand-written loop: DistributedSampler, DDP, no_sync while accumulating, torch.autocast."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    model, data = build(config["model"], config["samples"] * world)
    model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=config["batch"], sampler=sampler)
    k, bf16, device = config["accumulation"], config["mixed_precision"] == "bf16", torch.device("cpu")
    logging = config["logging"]
    epoch = [0]

    def run() -> int:
        sampler.set_epoch(epoch[0])
        epoch[0] += 1
        n = len(loader)
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            sync = (i + 1) % k == 0 or i + 1 == n
            with contextlib.nullcontext() if sync else model.no_sync():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(model(x), y)
                (loss / k if k > 1 else loss).backward()
            if sync:
                optimizer.step()
                optimizer.zero_grad()
            if logging:
                mean = loss.detach().clone()
                torch.distributed.all_reduce(mean)
                mean /= world
        return n

    return run


def distrib_variant(config: dict[str, Any], world: int, rank: int) -> Any:
    from distrib import accumulate, backward, prepare, reduce

    model, data = build(config["model"], config["samples"] * world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=config["batch"], shuffle=True)
    model, optimizer, loader = prepare(model, optimizer, loader)
    accumulating = config["accumulation"] > 1
    logging = config["logging"]

    def run() -> int:
        n = 0
        for x, y in loader:
            with accumulate(model) if accumulating else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
                backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if logging:
                reduce(loss.detach(), "mean")
            n += 1
        return n

    return run


def straggler_variant(config: dict[str, Any], world: int, rank: int) -> Any:
    """distrib with the straggler report on (started on the open scope, so the other variants run without)."""
    from distrib import current
    from distrib._straggler import KEY, StepTimer

    run = distrib_variant(config, world, rank)
    runtime = current()

    def timed() -> int:
        runtime.state.extensions[KEY] = StepTimer(runtime, 100, 0.2)
        try:
            return int(run())
        finally:
            del runtime.state.extensions[KEY]

    return timed


def accelerate_variant(config: dict[str, Any], world: int, rank: int) -> Any:
    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision=config["mixed_precision"], gradient_accumulation_steps=config["accumulation"]
    )
    model, data = build(config["model"], config["samples"] * world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=config["batch"], shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accumulating = config["accumulation"] > 1

    def run() -> int:
        n = 0
        for x, y in loader:
            with accelerator.accumulate(model) if accumulating else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if config["logging"]:
                accelerator.reduce(loss.detach(), "mean")
            n += 1
        return n

    return run


BUILDERS = {
    "raw": raw_variant,
    "distrib": distrib_variant,
    "distrib_straggler": straggler_variant,
    "accelerate": accelerate_variant,
}


def worker(launch: dict[str, Any]) -> None:
    import torch.distributed as dist

    from distrib import distributed

    (config,) = launch["cases"]  # one case per launch: Accelerate's settings are process-wide
    settings = {
        "mixed_precision": config["mixed_precision"],
        "gradient_accumulation_steps": config["accumulation"],
    }
    with distributed(**settings) as ctx:  # creates the gloo group that all three variants use
        runs = {name: BUILDERS[name](config, ctx.world_size, ctx.rank) for name in config["variants"]}
        times = _common.interleave(runs, config["rounds"], warmup=1, barrier=dist.barrier)
        _common.emit({"times": {config["case"]: times}})


def configs(args: Any) -> list[list[dict[str, Any]]]:
    sizes = QUICK_SIZES if args.quick else SIZES
    out = []
    for model, (samples, batch, rounds) in sizes.items():
        for mode, (precision, k) in MODES.items():
            variants = _common.variants_wanted(args)
            if mode == "logging":
                variants.insert(2, "distrib_straggler")
            out.append([{
                "case": f"{model}/{mode}",
                "describe": f"{model}, {mode}: batch {batch} per rank, {samples // batch} micro-batches per round",
                "model": model, "samples": samples, "batch": batch, "rounds": rounds,
                "mixed_precision": precision, "accumulation": k, "logging": mode == "logging",
                "variants": variants,
            }])  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = _common.parser(__doc__ or "").parse_args(argv)
    if args.worker:
        _common.run_worker(args, worker)
        return None
    cases = _common.run_cases(Path(__file__), args, configs(args), default_launches=5)
    return _common.finish(
        "step",
        args,
        {"title": "Training-step overhead", "unit": "µs per micro-batch", "goal": GOAL, "cases": cases},
    )


if __name__ == "__main__":
    main()
