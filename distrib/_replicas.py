"""The replica divergence check: state every rank must hold identically, compared every N optimizer steps.

With `check_replicas_every=N`, after every N-th optimizer step each rank computes a small digest of its
replicated state and one all-gather compares them: the replicated parameters and buffers (which tensors
are replicated is the strategy's call: `replicated_tensors` in the contract; FSDP2 and ZeRO-3 shards are
not), the optimizer step counts and learning rates, and the fp16 loss scale. A mismatch raises
`ReplicaDivergenceError` on every rank, naming the first diverging tensor, the ranks that differ from the
others and the step. It catches a rank that skipped an optimizer step, buffers that are not synchronised,
a scheduler stepped twice on one rank, different seeds.

A tensor's digest is exact in its bits: its words, read as integers, summed in int64 (twice: all of them,
and every other one), so any changed bit changes it but a digest is two numbers whatever the tensor's size.
Batch norms' running statistics are left out: DDP synchronises them at the start of each forward, so
they legitimately differ between a forward and the next.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .errors import ReplicaDivergenceError

if TYPE_CHECKING:
    from ._runtime import Runtime

_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BATCH_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def model_tensors(runtime: Runtime) -> Iterable[tuple[str, torch.Tensor]]:
    """The prepared models' parameters and buffers, by `named_parameters()` name (the default of the
    contract's `replicated_tensors`: every rank holds the whole model)."""
    for i, model in enumerate(runtime.state.models):
        inner = runtime.strategy_module.unwrap_model(model)
        prefix = f"model {i}: " if len(runtime.state.models) > 1 else ""
        yield from ((prefix + name, p) for name, p in inner.named_parameters())
        for module_name, module in inner.named_modules():
            is_norm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and not (is_norm and name in _BATCH_NORM_STATS):
                    yield prefix + ".".join(filter(None, (module_name, name))), buffer


def tensor_digest(tensor: torch.Tensor) -> tuple[int, int]:
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return 0, 0
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    words = flat.contiguous().view(_WORDS[flat.element_size()]).to(torch.int64)
    return int(words.sum()), int(words[::2].sum())


def _entries(runtime: Runtime) -> list[tuple[str, tuple[int, int]]]:
    entries = [("optimizer steps", (runtime.state.optimizer_steps, 0))]
    for i, optimizer in enumerate(runtime.state.optimizers):
        for j, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                lr = float(lr)
            if isinstance(lr, (int, float)):
                entries.append(
                    (f"learning rate of optimizer {i}, group {j}", tensor_digest(torch.tensor(float(lr))))
                )
    scaler = runtime.state.scaler
    if scaler is not None and scaler.is_enabled():
        entries.append(("fp16 loss scale", tensor_digest(torch.tensor(float(scaler.get_scale())))))
    for name, tensor in runtime.strategy_module.replicated_tensors(runtime):
        entries.append((name, tensor_digest(tensor)))
    return entries


def check(runtime: Runtime, step: int) -> None:
    """Compare this rank's digests with every other rank's; raise on every rank when they differ. `step`
    counts the accumulation windows completed, the same on every rank (their optimizer step counters may
    not be: that is one of the divergences found)."""
    entries = _entries(runtime)
    local = torch.tensor([len(entries)] + [v for _, pair in entries for v in pair], dtype=torch.int64)
    table = _gather(runtime, local)
    if bool((table == local).all()):
        return
    raise ReplicaDivergenceError(_describe(step, entries, table))


def _gather(runtime: Runtime, local: torch.Tensor) -> torch.Tensor:
    device = runtime.collective_device
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(runtime.world_size)]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.int64, device=device))
    longest = int(max(int(s) for s in sizes))
    padded = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded[: local.numel()] = local.to(device)
    rows = [torch.empty_like(padded) for _ in range(runtime.world_size)]
    dist.all_gather(rows, padded)
    return torch.stack(rows).cpu()  # with different lengths, never equal to `local`: described below


def _describe(step: int, entries: list[tuple[str, tuple[int, int]]], table: torch.Tensor) -> str:
    counts = table[:, 0].tolist()
    if len(set(counts)) > 1:
        listed = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        return (
            f"replica check at optimizer step {step}: the ranks hold different numbers of replicated tensors "
            f"({listed}); every rank must prepare the same models and optimizers."
        )
    for k, (name, _) in enumerate(entries):
        column = [tuple(row) for row in table[:, 1 + 2 * k : 3 + 2 * k].tolist()]
        if len(set(column)) > 1:
            return _divergence(name, column, step)
    return f"replica check at optimizer step {step}: the ranks' digests differ."  # pragma: no cover


def _divergence(name: str, column: list[Any], step: int) -> str:
    groups: dict[Any, list[int]] = {}
    for r, value in enumerate(column):
        groups.setdefault(value, []).append(r)
    majority = max(groups.values(), key=len)
    if len(majority) * 2 > len(column):  # a clear majority: name the ranks that left it
        odd = [r for r in range(len(column)) if r not in majority]
        who = f"differing: rank(s) {', '.join(map(str, odd))}; agreeing: rank(s) {', '.join(map(str, majority))}"
    else:
        who = " vs ".join(f"rank(s) {', '.join(map(str, g))}" for g in groups.values())
    return (
        f"replicas diverged at optimizer step {step}: {name!r} is not the same on every rank ({who}). "
        "Every rank must run the same optimizer steps, schedulers and seeds; look for code that runs on some "
        "ranks only (e.g. under `if rank == 0:`) or buffers that are not synchronised. "
        "(check_replicas_every sets how often this is checked; None turns it off.)"
    )
