"""The script `distrib test` launches: checks the real setup on every rank, rank 0 prints the report.

Run by the launcher as `sanity.py --expected-world-size N --expected-machines M`; also runs alone
(`python sanity.py`, one process). Every rank runs every check (they contain the same collectives in the
same order); a check returns an error message or None, and the results of all ranks are gathered so the
report shows which rank failed which check. Exit code 0 when all pass, 1 otherwise (from rank 0).
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

import distrib

Check = Callable[[Any, argparse.Namespace], "str | None"]
CHECKS: list[tuple[str, Check]] = []


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS.append((name, fn))
        return fn

    return register


@check("process group")
def _process_group(ctx: Any, args: argparse.Namespace) -> str | None:
    import torch.distributed as dist

    if ctx.world_size != args.expected_world_size:
        return f"world size {ctx.world_size}, expected {args.expected_world_size}"
    if ctx.world_size > 1 and not dist.is_initialized():
        return "no process group although world size > 1"
    return None


@check("ranks and devices")
def _ranks(ctx: Any, args: argparse.Namespace) -> str | None:
    me = (ctx.rank, ctx.local_rank, ctx.world_size, ctx.node_rank, ctx.num_nodes, str(ctx.device))
    everyone = distrib.gather_object(me)
    if sorted(r[0] for r in everyone) != list(range(ctx.world_size)):
        return f"ranks seen: {sorted(r[0] for r in everyone)}"
    if {r[4] for r in everyone} != {args.expected_machines}:
        return f"machines seen: {sorted({r[4] for r in everyone})}, expected {args.expected_machines}"
    per_node: dict[int, list[tuple[int, str]]] = {}
    for _, local_rank, _, node, _, device in everyone:
        per_node.setdefault(node, []).append((local_rank, device))
    for node, entries in per_node.items():
        if sorted(e[0] for e in entries) != list(range(len(entries))):
            return f"machine {node}: local ranks {sorted(e[0] for e in entries)}"
        accelerators = [d for _, d in entries if d != "cpu"]
        if len(set(accelerators)) != len(accelerators):
            return f"machine {node}: two ranks share a device: {sorted(accelerators)}"
    return None


@check("collectives")
def _collectives(ctx: Any, args: argparse.Namespace) -> str | None:
    n, device = ctx.world_size, ctx.device
    gathered = distrib.gather(torch.tensor([ctx.rank], device=device)).cpu().tolist()
    if gathered != list(range(n)):
        return f"gather gave {gathered}"
    total = distrib.reduce(torch.tensor([ctx.rank + 1.0], device=device), "sum").item()
    if total != n * (n + 1) / 2:
        return f"reduce(sum) gave {total}, expected {n * (n + 1) / 2}"
    mean = distrib.reduce(torch.tensor([float(ctx.rank)], device=device), "mean").item()
    if not math.isclose(mean, (n - 1) / 2):
        return f"reduce(mean) gave {mean}"
    value = distrib.broadcast(torch.tensor([ctx.rank * 10 + 7], device=device), from_process=0).item()
    if value != 7:
        return f"broadcast gave {value}, expected 7"
    distrib.wait_for_everyone()
    return None


@check("dataloader shards")
def _data(ctx: Any, args: argparse.Namespace) -> str | None:
    size = 3 * ctx.world_size + 1  # uneven on purpose: the last global batch is padded
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(size)), batch_size=2)
    loader = distrib.prepare(loader)
    local: list[int] = []
    metrics: list[int] = []
    for (x,) in loader:
        local += x.cpu().tolist()
        metrics += distrib.gather_for_metrics(x).cpu().tolist()
    if sorted(metrics) != list(range(size)):
        return f"gather_for_metrics over the epoch gave {sorted(metrics)}, expected 0..{size - 1} once each"
    union = set(distrib.gather_object(local))
    if union != set(range(size)):
        return f"the shards miss samples {sorted(set(range(size)) - union)}"
    return None


def _train_reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, step_size: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for start in range(0, len(x), step_size):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(
            model(x[start : start + step_size]), y[start : start + step_size]
        ).backward()
        optimizer.step()


@check("training matches one process")
def _training(ctx: Any, args: argparse.Namespace) -> str | None:
    per_rank, steps, accumulation = 2, 3, ctx.gradient_accumulation_steps
    global_batch = per_rank * ctx.world_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(global_batch * accumulation * steps, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 1)
    model = torch.nn.Linear(4, 1)
    model.load_state_dict(reference.state_dict())
    _train_reference(reference, x, y, global_batch * accumulation)
    batch_size = global_batch if ctx.settings.split_batches else per_rank
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = distrib.prepare(model, optimizer, loader)
    for xb, yb in loader:
        with distrib.accumulate(model):
            distrib.backward(torch.nn.functional.mse_loss(model(xb).float(), yb))
            optimizer.step()
            optimizer.zero_grad()
    tolerance = 1e-4 if ctx.mixed_precision == "no" else 5e-2
    state = distrib.get_state_dict(model)  # gathered by the strategy (FSDP2 shards, ZeRO-3 partitions)
    problem = None
    if state is not None:
        for name, want in reference.state_dict().items():
            error = (state[name].float() - want).abs().max().item()
            if not error <= tolerance:
                problem = (
                    f"{name!r} differs from one-process training by {error:.2e} (tolerance {tolerance:g})"
                )
                break
    return distrib.broadcast_object_list([problem])[0]


@check("mixed precision")
def _mixed_precision(ctx: Any, args: argparse.Namespace) -> str | None:
    # the strategy's precision plan says whether it autocasts (DeepSpeed casts its weights instead)
    expected = ctx.precision.autocast_dtype or torch.float32
    a = torch.randn(8, 8, device=ctx.device)
    with distrib.autocast():
        out = a @ a
    if out.dtype != expected:
        return f"a matmul under mixed_precision={ctx.mixed_precision!r} gave {out.dtype}, expected {expected}"
    if not torch.isfinite(out.float()).all():
        return "a matmul under autocast gave non-finite values"
    return None


def run_checks(ctx: Any, args: argparse.Namespace) -> list[tuple[str, str | None]]:
    results = []
    for name, fn in CHECKS:
        try:
            problem = fn(ctx, args)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        results.append((name, problem))
    return results


def report(ctx: Any, per_rank: list[list[tuple[str, str | None]]]) -> bool:
    """Print the table on rank 0; return True when every rank passed every check."""
    ok = True
    lines = [
        f"distrib test: {ctx.world_size} process(es) on {ctx.num_nodes} machine(s); strategy {ctx.strategy}, "
        f"device {ctx.device.type}, mixed precision {ctx.mixed_precision}"
    ]
    for i, (name, _) in enumerate(per_rank[0]):
        failed = [(rank, results[i][1]) for rank, results in enumerate(per_rank) if results[i][1]]
        ok = ok and not failed
        detail = "; ".join(f"rank {rank}: {problem}" for rank, problem in failed)
        lines.append(f"  [{'FAIL' if failed else 'PASS'}] {name}" + (f" - {detail}" if detail else ""))
    lines.append("All checks passed." if ok else "Some checks FAILED.")
    if ctx.rank == 0:
        print("\n".join(lines), flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--expected-world-size", type=int, default=1)
    parser.add_argument("--expected-machines", type=int, default=1)
    args = parser.parse_args(argv)
    with distrib.distributed() as ctx:
        results = run_checks(ctx, args)
        per_rank = [list(r) for r in distrib.gather_object(tuple(results))]
        ok = report(ctx, per_rank)
    return 0 if ok or ctx.rank != 0 else 1


if __name__ == "__main__":
    sys.exit(main())
