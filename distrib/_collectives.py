"""Collectives over nested structures of tensors (dicts, lists, tuples), plus object collectives.

`gather` sends one small header (every tensor's shape and dtype) and then one buffer per dtype, so a
mismatch between ranks is reported instead of hanging, and tensors whose first dimension differs are
gathered exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from ._runtime import Runtime, current
from ._tree import leaves, replace_leaves, tree_map
from .errors import CollectiveError

_MAX_DIMS = 8
_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
]  # fmt: skip


def _header(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    rows = []
    for t in tensors:
        if t.dim() > _MAX_DIMS:
            raise CollectiveError(f"cannot gather a tensor with {t.dim()} dimensions (at most {_MAX_DIMS}).")
        dims = list(t.shape) + [0] * (_MAX_DIMS - t.dim())
        rows.append([_DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1, t.dim(), *dims])
    return torch.tensor([len(tensors), *[v for row in rows for v in row]], dtype=torch.int64, device=device)


def _rows(rank_row: list[int], count: int) -> list[list[int]]:
    width = _MAX_DIMS + 2
    return [rank_row[1 + i * width : 1 + (i + 1) * width] for i in range(count)]


def _check_compatible(caller: str, headers: torch.Tensor, count: int) -> list[list[torch.Size]]:
    """Per rank, the shape of each tensor; raises when anything but the first dimension differs."""
    table = headers.tolist()
    if any(row[0] != count for row in table):
        counts = ", ".join(str(row[0]) for row in table)
        raise CollectiveError(f"{caller}(): the ranks passed different numbers of tensors ({counts}).")
    per_rank = [_rows(row, count) for row in table]
    shapes = [[torch.Size(r[2 : 2 + r[1]]) for r in rows] for rows in per_rank]
    for i in range(count):
        if len({rows[i][0] for rows in per_rank}) > 1:
            raise CollectiveError(
                f"{caller}(): tensor #{i} has different dtypes across ranks; cast it to one dtype first."
            )
        if len({s[i][1:] for s in shapes}) > 1:
            listed = ", ".join(str(tuple(s[i])) for s in shapes)
            raise CollectiveError(
                f"{caller}(): tensor #{i} has different shapes across ranks ({listed}); only the first "
                "dimension may differ. Pad them to one shape first with pad_across_processes(tensor, dim=...)."
            )
    return shapes


def _data_group(runtime: Runtime, name: str = "dp") -> tuple[Any, int]:
    """(group, size) of the data collectives: the data-parallel ranks under N-D parallelism, whose other
    ranks (tensor/context/pipeline) hold copies of the same samples; else every rank (group None)."""
    if runtime.parallel is None:
        return None, runtime.world_size
    return runtime.parallel.group(name), runtime.parallel.size(name)


def _all_gather_tensors(caller: str, runtime: Runtime, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    group, world = _data_group(runtime)
    tensors = [t.reshape(1) if t.dim() == 0 else t for t in tensors]
    device = tensors[0].device if tensors else runtime.device
    header = _header(tensors, device)
    headers = torch.empty(world, header.numel(), dtype=torch.int64, device=device)
    dist.all_gather(list(headers.unbind(0)), header, group=group)
    if bool((headers == header).all()):
        return _gather_same_shapes(tensors, world, group)  # the common case: nothing to check or unpad
    shapes = _check_compatible(caller, headers, len(tensors))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        sizes = [sum(shapes[r][i].numel() for i in idx) for r in range(world)]
        buffer = torch.zeros(max(sizes), dtype=dtype, device=device)
        local = torch.cat([tensors[i].reshape(-1) for i in idx])
        buffer[: local.numel()] = local
        parts = [torch.empty_like(buffer) for _ in range(world)]
        dist.all_gather(parts, buffer, group=group)
        per_rank = []
        for r in range(world):
            pieces = parts[r][: sizes[r]].split([shapes[r][i].numel() for i in idx])
            per_rank.append([p.view(shapes[r][i]) for p, i in zip(pieces, idx)])
        for k, i in enumerate(idx):
            out[i] = torch.cat([per_rank[r][k] for r in range(world)])
    return [t for t in out if t is not None]


def _gather_same_shapes(tensors: list[torch.Tensor], world: int, group: Any = None) -> list[torch.Tensor]:
    """Every rank sent the same shapes: one flat buffer per dtype, results are (mostly) views of it."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        local = (
            tensors[idx[0]].reshape(-1) if len(idx) == 1 else torch.cat([tensors[i].reshape(-1) for i in idx])
        )
        gathered = local.new_empty(world * local.numel())
        dist.all_gather(list(gathered.chunk(world)), local.contiguous(), group=group)
        rows = gathered.view(world, -1)
        offset = 0
        for i in idx:
            t = tensors[i]
            piece = rows[:, offset : offset + t.numel()]
            out[i] = piece.reshape(world * t.shape[0], *t.shape[1:])
            offset += t.numel()
    return [t for t in out if t is not None]


def gather(data: Any) -> Any:
    """Gather tensors (in any nested structure) from every rank, concatenated along dim 0 in rank order.

    With N-D parallelism (the `parallelism` setting) it gathers over the data-parallel ranks only: the
    ranks of one tensor/context/pipeline group hold the same samples. Scalars become 1-element tensors. Tensors may differ in their first dimension only; otherwise a
    `CollectiveError` says to use `pad_across_processes`. Example::

        all_losses = gather(loss.detach())       # shape [world_size]
        preds, labels = gather((preds, labels))
    """
    runtime = current("gather")
    tensors = leaves(data)
    if _data_group(runtime)[1] == 1:
        return tree_map(lambda t: t.reshape(1) if t.dim() == 0 else t, data)
    return replace_leaves(data, _all_gather_tensors("gather", runtime, tensors))


def gather_object(obj: Any) -> list[Any]:
    """Gather any picklable object from every rank; lists are concatenated, other objects listed by rank.

    Example::

        names = gather_object([f"sample-{i}" for i in my_ids])
    """
    runtime = current("gather_object")
    return _gather_objects(obj, None, runtime.world_size)


def _gather_objects(obj: Any, group: Any, world: int) -> list[Any]:
    if world == 1:
        return list(obj) if isinstance(obj, list) else [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    if isinstance(obj, list):
        return [item for part in out for item in part]
    return out


def gather_for_metrics(data: Any, use_gather_object: bool = False) -> Any:
    """Gather predictions and labels for metrics, dropping the samples `even_batches` repeated.

    On the last batch of a prepared dataloader the padding added to keep ranks in step is removed, so an
    evaluation set of 13 samples yields exactly 13 results, in dataset order. Works for tensors (nested)
    and for lists of any objects. Example::

        for x, y in eval_loader:
            preds, labels = gather_for_metrics((model(x).argmax(-1), y))
            metric.update(preds, labels)
    """
    runtime = current("gather_for_metrics")
    tensors = leaves(data)
    object_mode = use_gather_object or not tensors
    gathered = _gather_objects(data, *_data_group(runtime)) if object_mode else gather(data)
    loader = runtime.state.active_dataloader
    remainder = getattr(loader, "remainder", None) if loader is not None else None
    if _data_group(runtime)[1] == 1 or loader is None or not loader.end_of_dataloader or remainder is None:
        return gathered
    if object_mode:
        return gathered[:remainder]
    return tree_map(lambda t: t[:remainder], gathered)


def pad_across_processes(data: Any, dim: int = 0, pad_index: Any = 0, pad_first: bool = False) -> Any:
    """Pad tensors along `dim` to the largest size any rank has, so they can be gathered.

    Example::

        tokens = pad_across_processes(tokens, dim=1, pad_index=tokenizer.pad_token_id)
        all_tokens = gather(tokens)
    """
    runtime = current("pad_across_processes")
    group, world = _data_group(runtime)
    if world == 1:
        return data

    def pad(t: torch.Tensor) -> torch.Tensor:
        d = dim % t.dim()
        size = torch.tensor([t.shape[d]], device=t.device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        longest = int(max(s.item() for s in sizes))
        if longest == t.shape[d]:
            return t
        shape = list(t.shape)
        shape[d] = longest
        out = t.new_full(shape, pad_index)
        index = [slice(None)] * t.dim()
        index[d] = slice(longest - t.shape[d], longest) if pad_first else slice(0, t.shape[d])
        out[tuple(index)] = t
        return out

    return tree_map(pad, data)


def reduce(data: Any, reduction: Literal["sum", "mean"] = "sum", scale: float = 1.0) -> Any:
    """All-reduce tensors (nested) across ranks; returns new tensors. With N-D parallelism it reduces over
    the data- and context-parallel ranks (each holds a different part of the batch). Example::

    mean_loss = reduce(loss.detach(), "mean")
    """
    runtime = current("reduce")
    if reduction not in ("sum", "mean"):
        raise CollectiveError(f"reduce(reduction={reduction!r}) must be 'sum' or 'mean'.")

    # a loss is averaged over the ranks that saw different samples (and sequence slices): dp x cp
    group, world = _data_group(runtime, "dp_cp")
    if world > 1:
        _check_same_shapes("reduce", runtime, leaves(data), group, world)

    def one(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        if world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        if reduction == "mean":
            out = out / world
        return out * scale if scale != 1.0 else out

    return tree_map(one, data)


def _check_same_shapes(
    caller: str, runtime: Runtime, tensors: list[torch.Tensor], group: Any = None, world: int | None = None
) -> None:
    """Raise (on every rank) instead of hanging when the ranks' tensors differ in shape or dtype."""
    device = tensors[0].device if tensors else runtime.device
    header = _header(tensors, device)
    world = runtime.world_size if world is None else world
    headers = torch.empty(world, header.numel(), dtype=torch.int64, device=device)
    dist.all_gather(list(headers.unbind(0)), header, group=group)
    if bool((headers == header).all()):
        return
    table = headers.tolist()
    listed = "; ".join(
        f"rank {r}: {[tuple(row[2 : 2 + row[1]]) for row in _rows(rank_row, len(tensors))]}"
        for r, rank_row in enumerate(table)
    )
    raise CollectiveError(
        f"{caller}(): the ranks passed tensors of different shapes or dtypes ({listed}); every rank must "
        "reduce tensors of one shape and dtype. Pad them first with pad_across_processes(tensor, dim=...)."
    )


def broadcast(data: Any, from_process: int = 0) -> Any:
    """Send rank `from_process`'s tensors (nested) to every rank, in place; returns `data`. Example::

    seed = broadcast(torch.tensor([seed]))
    """
    runtime = current("broadcast")
    if runtime.world_size > 1:
        for t in leaves(data):
            dist.broadcast(t, src=from_process)
    return data


def broadcast_object_list(objects: list[Any], from_process: int = 0) -> list[Any]:
    """Send rank `from_process`'s list of picklable objects to every rank, in place. Example::

    config = broadcast_object_list([config if is_main_process() else None])[0]
    """
    runtime = current("broadcast_object_list")
    if runtime.world_size > 1:
        dist.broadcast_object_list(objects, src=from_process)
    return objects


def wait_for_everyone() -> None:
    """Block until every rank reaches this line. Example: `wait_for_everyone()` before reading a file
    the main process wrote."""
    if current("wait_for_everyone").world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def split_between_processes(inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
    """Give each rank its contiguous share of a list, tuple, tensor or dict of them.

    Shares differ by at most one item; `apply_padding=True` repeats the last item so all shares are
    equally long (drop the extra results afterwards). Example::

        with split_between_processes(prompts) as my_prompts:
            results = [generate(p) for p in my_prompts]
    """
    runtime = current("split_between_processes")
    # by data-parallel rank: ranks of one tensor/context/pipeline group must get the same share
    yield _share(inputs, runtime.dp_rank, runtime.dp_world_size, apply_padding)


def _share(inputs: Any, rank: int, world: int, pad: bool) -> Any:
    if isinstance(inputs, dict):
        return {k: _share(v, rank, world, pad) for k, v in inputs.items()}
    if not isinstance(inputs, (Sequence, torch.Tensor)) or isinstance(inputs, str):
        raise CollectiveError(
            f"split_between_processes() splits lists, tuples, tensors and dicts of them, not {type(inputs).__name__}."
        )
    n = len(inputs)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    part = inputs[start : start + base + (1 if rank < extra else 0)]
    longest = base + (1 if extra else 0)
    if pad and n and len(part) < longest:
        filler = inputs[-1:] if len(part) == 0 else part[-1:]
        if isinstance(part, torch.Tensor) and isinstance(filler, torch.Tensor):
            part = torch.cat([part, filler.expand(longest - len(part), *filler.shape[1:])])
        else:
            part = list(part) + list(filler) * (longest - len(part))
    return part
