"""Per-rank memory of parameters, gradients and optimizer state: DDP, FSDP2, tensor parallel (TP),
FSDP2 x TP and DeepSpeed ZeRO-3.

The same transformer-like model (8 blocks of width 256 with a 4x MLP, about 4.2 M parameters, fp32) is
prepared by distrib under each strategy with AdamW, on 2 and on 4 CPU processes (gloo). After one full
optimizer step and a second backward (so gradients and optimizer state both exist), every rank counts the
bytes of the tensor storages it holds, each storage once:

* DDP: the parameters, their `.grad`, and the optimizer's state (DDP's own bucket copies of the gradients
  are not visible to Python and are not counted);
* FSDP2: the local shards of the DTensor parameters, gradients and optimizer state;
* TP (`parallelism={"tp": N}`, every block's MLP split column- then row-wise, see `TP_PLAN`): the local
  shards of the split layers plus the whole norms and head, which stay replicated; FSDP2 x TP
  (`strategy="fsdp"`, `tp=2`, data-parallel shards over the rest) shards both ways;
* ZeRO-3: each parameter's local partition (`ds_tensor`), then every tensor reachable from DeepSpeed's
  optimizer object (fp32 master partitions and the AdamW state: "optimizer"; buffers whose attribute
  path names a gradient or an "ipg" gradient bucket: "grads"). DeepSpeed keeps an fp32 master copy even for fp32 training, so its
  optimizer column includes one more partition than FSDP's. Its buckets are sized for this model (see
  `ZERO3`): with DeepSpeed's defaults each rank also allocates a 1.9 GB reduce bucket.

The sharded columns should be about 1/N of DDP's; TP a bit more (its replicated norms and head). Run with:

    python benchmarks/bench_memory.py [--json memory.json] [--world-sizes 2 4]

It prints a Markdown table. DeepSpeed is skipped (with a note) where it is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's distrib

WIDTH, NUM_BLOCKS, BATCH = 256, 8, 4
MB = 2**20
#: buckets sized for this model: DeepSpeed's default reduce bucket (5e8 elements) is a 1.9 GB fp32 buffer
#: per rank (virtual until touched); persistence threshold 0 partitions the small biases too
ZERO3 = {
    "zero_stage": 3,
    "config": {
        "zero_optimization": {
            "reduce_bucket_size": 2**20,
            "stage3_prefetch_bucket_size": 2**20,
            "stage3_param_persistence_threshold": 0,
        }
    },
}


#: the tensor-parallel plan of `Model`
TP_PLAN = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(NUM_BLOCKS)])
        self.head = nn.Linear(WIDTH, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Ledger:
    """Bytes per category, each tensor storage counted once (views of one buffer share a storage)."""

    def __init__(self) -> None:
        self.bytes = {"params": 0, "grads": 0, "optimizer": 0}
        self._seen: set[int] = set()

    def add(self, tensor: Any, category: str) -> None:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self._seen:
            return
        self._seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()


def _count_plain(model: nn.Module, optimizer: Any) -> Ledger:
    ledger = Ledger()
    for p in model.parameters():
        ledger.add(p, "params")
        if p.grad is not None:
            ledger.add(p.grad, "grads")
    for state in optimizer.optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                ledger.add(value, "optimizer")
    return ledger


def _walk(obj: Any, path: str, ledger: Ledger, visited: set[int], depth: int = 0) -> None:
    """Every tensor reachable from DeepSpeed's optimizer (not entering modules or process groups)."""
    if id(obj) in visited or depth > 6 or isinstance(obj, nn.Module):
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        is_gradient = "grad" in path.lower() or "ipg" in path.lower()  # ipg: DeepSpeed's gradient buckets
        ledger.add(obj, "grads" if is_gradient else "optimizer")
        if obj.grad is not None:
            ledger.add(obj.grad, "grads")
        return
    if isinstance(obj, dict):
        children = [(f"{path}[{k}]" if isinstance(k, str) else path, v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        children = [(path, v) for v in obj]
    elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch") and hasattr(obj, "__dict__"):
        if type(obj).__module__.startswith("torch.distributed"):
            return
        children = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    else:
        return
    for child_path, child in children:
        _walk(child, child_path, ledger, visited, depth + 1)


def _count_zero3(engine: Any) -> Ledger:
    ledger = Ledger()
    for p in engine.module.parameters():
        ledger.add(getattr(p, "ds_tensor", p), "params")
    _walk(engine.optimizer, "optimizer", ledger, set())
    return ledger


def _measure(strategy: str, settings: dict[str, Any]) -> dict[str, int]:
    from distrib import backward, distributed, prepare
    from distrib.strategies import deepspeed as ds_strategy

    with distributed(strategy=strategy, **settings):
        torch.manual_seed(0)
        model = Model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.utils.data.TensorDataset(torch.randn(64, WIDTH), torch.randint(0, 16, (64,)))
        model, optimizer, loader = prepare(
            model, optimizer, torch.utils.data.DataLoader(data, batch_size=BATCH)
        )
        batches = iter(loader)
        for step in range(2):
            x, y = next(batches)
            backward(nn.functional.cross_entropy(model(x), y))
            if step == 0:
                optimizer.step()
                optimizer.zero_grad()
        ledger = (
            _count_zero3(model)
            if isinstance(optimizer, ds_strategy.EngineOptimizer)
            else _count_plain(model, optimizer)
        )
        return dict(ledger.bytes)


def _worker(with_deepspeed: bool) -> dict[str, dict[str, int]]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        results = {
            "DDP": _measure("ddp", {}),
            "FSDP2 (full)": _measure("fsdp", {}),
            f"TP (tp={world})": _measure("ddp", {"parallelism": {"tp": world, "tp_plan": TP_PLAN}}),
            f"FSDP2 x TP ({world // 2} x 2)": _measure(
                "fsdp", {"parallelism": {"tp": 2, "tp_plan": TP_PLAN}}
            ),
        }
        if with_deepspeed:
            results["ZeRO-3"] = _measure("deepspeed", {"deepspeed": ZERO3})
        return results
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run(world_sizes: list[int]) -> list[dict[str, Any]]:
    from distrib.testing import run_ranks

    with_deepspeed = importlib.util.find_spec("deepspeed") is not None
    rows = []
    for world in world_sizes:
        per_rank = run_ranks(_worker, world, with_deepspeed, timeout=900)
        for strategy in per_rank[0]:
            worst = max(per_rank, key=lambda r: sum(r[strategy].values()))[strategy]  # the largest rank
            ddp_total = sum(max(per_rank, key=lambda r: sum(r["DDP"].values()))["DDP"].values())
            total = sum(worst.values())
            rows.append({"strategy": strategy, "world_size": world, **worst, "total": total,
                         "vs_ddp": total / ddp_total})  # fmt: skip
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | processes | params MB | grads MB | optimizer MB | total MB | total vs DDP |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['world_size']} | {r['params'] / MB:.2f} | {r['grads'] / MB:.2f} | "
            f"{r['optimizer'] / MB:.2f} | {r['total'] / MB:.2f} | {r['vs_ddp']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure, print the Markdown table, and write the rows as JSON with `--json PATH`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    rows = run(args.world_sizes)
    params = sum(p.numel() for p in Model().parameters())
    print(
        f"Model: {params / 1e6:.2f} M parameters ({params * 4 / MB:.1f} MB in fp32), AdamW; largest rank shown.\n"
    )
    print(to_markdown(rows))
    if importlib.util.find_spec("deepspeed") is None:
        print("\n(DeepSpeed is not installed: pip install 'distrib[deepspeed]' to add ZeRO-3.)")
    if args.json is not None:
        args.json.write_text(json.dumps({"parameters": params, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
