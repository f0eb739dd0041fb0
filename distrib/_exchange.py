"""Moving and unpacking the data of collectives once the ranks agreed (see `_agreement.py`).

Payloads travel as bytes: every tensor of a call is viewed as uint8 and concatenated, so a tuple of
predictions and labels is one message, whatever their dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ._agreement import (
    Agreement,
    Header,
    all_gather_rows,
    as_bytes,
    flat,
    from_bytes,
    ledger_of,
    peer_failure,
)
from ._ledger import DTYPES, TENSOR, Key, describe_row
from ._mismatch import describe_shapes
from ._runtime import Runtime
from ._tree import replace_leaves

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


def rebuild(data: Any, spec: Any, new: list[Any]) -> Any:
    """`data` with its tensors replaced, in order, by `new` (cheap for a tensor or a flat tuple/list)."""
    if spec == TENSOR:
        return new[0]
    if type(data) in (tuple, list) and all(child == TENSOR for child in spec[1]):
        return type(data)(new)
    return replace_leaves(data, new)


def _columns(rows: torch.Tensor, key: Key, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    """One tensor's columns of `[world, width]` payload rows, as `dtype` (not yet contiguous)."""
    piece = rows if offset == 0 and count == rows.shape[1] else rows[:, offset : offset + count]
    if key.unit is dtype:
        return piece
    piece = piece.contiguous()  # bytes: a copy, except for a whole row of one tensor
    if piece.storage_offset() % dtype.itemsize:
        piece = piece.clone()
    return piece.view(dtype)


def stacked(rows: torch.Tensor, key: Key) -> list[torch.Tensor]:
    """Every rank's tensors from uniform payload rows, each as `[world, *shape]`."""
    world = rows.shape[0]
    return [_columns(rows, key, dtype, off, n).reshape(world, *shape) for dtype, shape, off, n in key.layout]


def concatenated(rows: torch.Tensor, key: Key) -> list[torch.Tensor]:
    """Every rank's tensors from uniform payload rows, concatenated along dim 0 in rank order."""
    world = rows.shape[0]
    return [
        _columns(rows, key, dtype, off, n).reshape(world * shape[0], *shape[1:])
        for dtype, shape, off, n in key.layout
    ]


def _unpack_row(row: torch.Tensor, key: Key) -> list[torch.Tensor]:
    """The tensors of one rank's payload row (1-D, contiguous)."""
    if key.unit is torch.uint8:
        return [from_bytes(row[off : off + n], dtype, shape) for dtype, shape, off, n in key.layout]
    return [row[off : off + n].view(shape) for _, shape, off, n in key.layout]


def gather_ragged(runtime: Runtime, agreement: Agreement, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gather tensors whose first dimension differs between ranks: pad every payload to the longest."""
    headers = agreement.headers
    assert headers is not None
    device = agreement.device
    longest = max(h.nbytes for h in headers)
    send = torch.zeros(longest, dtype=torch.uint8, device=device)
    if leaves:
        mine = torch.cat([as_bytes(t, device) for t in leaves])
        send[: mine.numel()] = mine
    rows = all_gather_rows(ledger_of(runtime), send)
    out: list[list[torch.Tensor]] = [[] for _ in leaves]
    for r, header in enumerate(headers):
        offset = 0
        for i, (code, shape) in enumerate(header.tensors):
            dtype = DTYPES[code]
            nbytes = dtype.itemsize * _numel(shape)
            out[i].append(from_bytes(rows[r, offset : offset + nbytes], dtype, shape))
            offset += nbytes
    return [torch.cat(parts) for parts in out]


def reduce_stacked(stack: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce `[world, ...]` over ranks, in rank order (so every rank gets the same bits)."""
    dtype = stack.dtype
    if reduction == "mean" and stack.is_floating_point():
        return stack.mean(0)
    if reduction in ("sum", "mean"):  # an integer mean is divided by the caller (into floats)
        out = stack.sum(0)
    elif reduction == "max":
        out = stack.amax(0)
    elif reduction == "min":
        out = stack.amin(0)
    else:
        out = stack.prod(0)
    return out if out.dtype == dtype else out.to(dtype)


def reduce_native(
    runtime: Runtime, agreement: Agreement, leaves: list[torch.Tensor], reduction: str
) -> list[torch.Tensor]:
    """All-reduce large payloads in place of an all-gather: one buffer per dtype."""
    device = agreement.device
    out: list[torch.Tensor | None] = [None] * len(leaves)
    for dtype in dict.fromkeys(t.dtype for t in leaves):
        idx = [i for i, t in enumerate(leaves) if t.dtype == dtype]
        buffer = torch.cat([leaves[i].detach().reshape(-1).to(device) for i in idx])
        _call(runtime, dist.all_reduce, buffer, op=_REDUCE_OPS[reduction])
        if reduction == "mean" and buffer.is_floating_point():
            buffer /= runtime.world_size  # as reduce_stacked's mean: the caller divides integers only
        for i, piece in zip(idx, buffer.split([leaves[i].numel() for i in idx])):
            out[i] = piece.view(leaves[i].shape)
    return [t for t in out if t is not None]


def broadcast_into(runtime: Runtime, agreement: Agreement, leaves: list[torch.Tensor], src: int) -> None:
    """Write rank `src`'s tensors into `leaves`, in place (from the payload rows, or by a broadcast)."""
    key = agreement.key
    if agreement.rows is not None:
        sources = _unpack_row(agreement.rows[src].contiguous(), key)
    else:
        pack = as_bytes if key.unit is torch.uint8 else flat
        buffer = torch.cat([pack(t, agreement.device) for t in leaves])
        _call(runtime, dist.broadcast, buffer, src=src)
        sources = _unpack_row(buffer, key)
    with torch.no_grad():
        for leaf, source in zip(leaves, sources):
            leaf.copy_(source)


def broadcast_bytes(runtime: Runtime, data: torch.Tensor, size: int, src: int, device: torch.device) -> bytes:
    """Rank `src`'s bytes (`size` of them, agreed beforehand) on every rank."""
    buffer = data.to(device) if runtime.rank == src else torch.empty(size, dtype=torch.uint8, device=device)
    _call(runtime, dist.broadcast, buffer, src=src)
    return bytes(buffer.cpu().numpy().tobytes())


def _call(runtime: Runtime, fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as exc:
        raise peer_failure(ledger_of(runtime), exc) from exc


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- what each collective accepts from the ranks ---------------------------------------------------------


def gatherable(headers: list[Header]) -> str | None:
    """Gather needs one dtype and one shape per tensor, except for the first dimension."""
    for i in range(len(headers[0].tensors)):
        rows = [h.tensors[i] for h in headers]
        if len({code for code, _ in rows}) > 1:
            return (
                f"tensor #{i} has different dtypes across ranks ({describe_shapes(headers, i)}); cast it to one "
                "dtype first"
            )
        if len({shape[1:] for _, shape in rows}) > 1 or len({len(shape) for _, shape in rows}) > 1:
            return (
                f"tensor #{i} has different shapes across ranks ({describe_shapes(headers, i)}); only the first "
                "dimension may differ. Pad them to one shape first with pad_across_processes(tensor, dim=...)"
            )
    return None


def identical(verb: str, fix: str) -> Any:
    """Reduce and broadcast need the very same shapes and dtypes on every rank."""

    def check(headers: list[Header]) -> str | None:
        if all(h.key == headers[0].key for h in headers):
            return None
        listed = "; ".join(
            f"rank {r}: {', '.join(describe_row(*t) for t in h.tensors) or 'nothing'}"
            for r, h in enumerate(headers)
        )
        return (
            f"the ranks passed tensors of different shapes or dtypes ({listed}); every rank must {verb} "
            f"tensors of one shape and dtype. {fix}"
        )

    return check


def paddable(headers: list[Header]) -> str | None:
    """Padding needs the same number of dimensions and the same dtype per tensor on every rank."""
    for i in range(len(headers[0].tensors)):
        rows = [h.tensors[i] for h in headers]
        if len({len(shape) for _, shape in rows}) > 1:
            return (
                f"tensor #{i} has different numbers of dimensions across ranks ({describe_shapes(headers, i)}); "
                "only the size along one dimension may differ"
            )
        if len({code for code, _ in rows}) > 1:
            return f"tensor #{i} has different dtypes across ranks ({describe_shapes(headers, i)}); cast it first"
    return None
