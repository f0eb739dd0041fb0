"""Collectives over nested structures of tensors (dicts, lists, tuples), object collectives, the
cross-rank trigger.

Every collective here is checked: the ranks agree that they are in the same collective (op, call site,
structure, shapes, dtypes, arguments) before its result is used, and every rank raises
`CollectiveMismatchError` with a table of every rank's call when they are not, instead of hanging or
returning wrong data. In the common case the check travels inside the data's own all-gather (see
`_agreement.py`), so it costs no extra collective; every call is recorded in the collective ledger.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from . import _exchange
from ._agreement import Collective, all_gather_rows, ledger_of
from ._ledger import OTHER, Site, call_site, fixed_site, flatten
from ._mismatch import LEAVE_SCOPE
from ._runtime import Runtime, current
from ._tree import tree_map
from .errors import CollectiveError

Reduction = Literal["sum", "mean", "max", "min", "product"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean", "max", "min", "product")
_REDUCTION_ARGUMENTS = {r: (("reduction", r),) for r in REDUCTIONS}
_REDUCE_CHECK = _exchange.identical("reduce", "Pad them first with pad_across_processes(tensor, dim=...).")
_BROADCAST_CHECK = _exchange.identical(
    "pass",
    "broadcast writes into every rank's tensors in place: give them the sending rank's shapes and dtypes.",
)
_TRIGGER = "trigger"


def _representatives(runtime: Runtime, keep: tuple[str, ...]) -> list[int] | None:
    """Under N-D parallelism, the world ranks whose data counts once: index 0 of every mesh dimension but
    those in `keep` (the ranks of one tensor/context/pipeline group hold copies of the same samples).
    None without the `parallelism` setting (every rank counts)."""
    parallel = runtime.parallel
    if parallel is None:
        return None
    mesh = parallel.mesh
    ranks = mesh.mesh
    for axis, name in reversed(list(enumerate(mesh.mesh_dim_names or ()))):
        if name not in keep:
            ranks = ranks.select(axis, 0)
    return sorted(int(r) for r in ranks.reshape(-1).tolist())


_DATA_DIMS = ("dp_replicate", "dp_shard")  # gather: one copy of every sample
_LOSS_DIMS = ("dp_replicate", "dp_shard", "cp")  # reduce: each holds a different part of the batch


def _only_representatives(runtime: Runtime, data: Any) -> Any:
    """Non-representative ranks send no rows (`t[:0]`), so a gather concatenates one copy per sample."""
    chosen = _representatives(runtime, _DATA_DIMS)
    if chosen is None or runtime.rank in chosen:
        return data
    return tree_map(lambda t: _at_least_1d(t)[:0], data)


def gather(data: Any) -> Any:
    """Gather tensors (in any nested structure) from every rank, concatenated along dim 0 in rank order.

    With N-D parallelism (the `parallelism` setting) it gathers one copy per data-parallel rank: the
    ranks of one tensor/context/pipeline group hold the same samples, and the first of them is taken, so
    every rank receives the same result. Scalars become 1-element tensors. Tensors may differ in their
    first dimension only; otherwise every rank raises a `CollectiveMismatchError` naming each rank's
    shapes (pad with `pad_across_processes`).
    Example::

        all_losses = gather(loss.detach())       # shape [world_size]
        preds, labels = gather((preds, labels))
    """
    runtime = current("gather")
    if runtime.world_size == 1:
        return tree_map(_at_least_1d, data)
    return _gather(runtime, "gather", call_site(1), _only_representatives(runtime, data))


def _at_least_1d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1) if t.dim() == 0 else t


def _gather(
    runtime: Runtime, op: str, site: Site, data: Any, flat: tuple[list[torch.Tensor], Any] | None = None
) -> Any:
    leaves, spec = flat or flatten(data)
    if leaves[0].dim() == 0 if len(leaves) == 1 else any(t.dim() == 0 for t in leaves):
        leaves = [t.reshape(1) if t.dim() == 0 else t for t in leaves]
    with Collective(runtime, op, site, leaves, spec, compatible=_exchange.gatherable) as agreement:
        if agreement.rows is not None:
            gathered = _exchange.concatenated(agreement.rows, agreement.key)
        else:
            gathered = _exchange.gather_ragged(runtime, agreement, leaves)
    return _exchange.rebuild(data, spec, gathered)


def gather_object(obj: Any) -> list[Any]:
    """Gather any picklable object from every rank; lists are concatenated, other objects listed by rank.

    Example::

        names = gather_object([f"sample-{i}" for i in my_ids])
    """
    runtime = current("gather_object")
    if runtime.world_size == 1:
        return list(obj) if isinstance(obj, list) else [obj]
    return _gather_object(runtime, "gather_object", call_site(1), obj)


def _gather_object(runtime: Runtime, op: str, site: Site, obj: Any) -> list[Any]:
    chosen = _representatives(runtime, _DATA_DIMS)
    if chosen is not None and runtime.rank not in chosen and isinstance(obj, list):
        obj = []  # one copy of every sample (N-D parallelism)
    data, error = _pickled(obj)
    spec = "list" if isinstance(obj, list) else "object"
    with Collective(runtime, op, site, [], spec, nbytes=data.numel(), error=error) as agreement:
        assert agreement.headers is not None
        sizes = [h.nbytes for h in agreement.headers]
        send = torch.zeros(max(sizes), dtype=torch.uint8, device=agreement.device)
        send[: data.numel()] = data.to(agreement.device)
        rows = all_gather_rows(ledger_of(runtime), send).cpu()
        # unpickled from this job's own ranks, as torch.distributed.all_gather_object does
        parts = [pickle.loads(rows[r, :n].numpy().tobytes()) for r, n in enumerate(sizes)]
    if isinstance(obj, list):
        return [item for part in parts for item in part]
    return parts if chosen is None else [parts[r] for r in chosen]


def _pickled(obj: Any) -> tuple[torch.Tensor, str | None]:
    try:
        payload = pickle.dumps(obj)
    except Exception as exc:  # every rank must hear of it, or the others would wait for this one
        return torch.empty(0, dtype=torch.uint8), f"cannot pickle {type(obj).__name__}: {exc}"
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8), None


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
    flat = flatten(data)
    object_mode = use_gather_object or not flat[0]
    if runtime.world_size == 1:
        return gather_object(data) if object_mode else tree_map(_at_least_1d, data)
    site = call_site(1)
    if object_mode:
        gathered = _gather_object(runtime, "gather_for_metrics", site, data)
    elif runtime.parallel is not None:
        gathered = _gather(runtime, "gather_for_metrics", site, _only_representatives(runtime, data))
    else:
        gathered = _gather(runtime, "gather_for_metrics", site, data, flat)
    loader = runtime.state.active_dataloader
    if loader is None or not loader.end_of_dataloader:
        return gathered
    remainder = getattr(loader, "remainder", None)
    if remainder is None:
        return gathered
    if object_mode:
        return gathered[:remainder]
    return tree_map(lambda t: t[:remainder], gathered)


def pad_across_processes(data: Any, dim: int = 0, pad_index: Any = 0, pad_first: bool = False) -> Any:
    """Pad tensors along `dim` to the largest size any rank has, so they can be gathered.

    Every rank must pass the same structure, and tensors with the same number of dimensions and dtype.
    Example::

        tokens = pad_across_processes(tokens, dim=1, pad_index=tokenizer.pad_token_id)
        all_tokens = gather(tokens)
    """
    runtime = current("pad_across_processes")
    if runtime.world_size == 1:
        return data
    leaves, spec = flatten(data)
    site = call_site(1)
    extra = (("dim", dim),)
    with Collective(
        runtime,
        "pad_across_processes",
        site,
        leaves,
        spec,
        extra=extra,
        payload=False,
        compatible=_exchange.paddable,
    ) as agreement:
        for t in leaves:
            _check_dim(t, dim)
        if agreement.rows is not None:
            return data  # every rank has the same shapes: nothing to pad
        assert agreement.headers is not None
        padded = [
            _pad(
                t,
                dim % t.dim(),
                max(h.tensors[i][1][dim % t.dim()] for h in agreement.headers),
                pad_index,
                pad_first,
            )
            for i, t in enumerate(leaves)
        ]
    return _exchange.rebuild(data, spec, padded)


def _check_dim(t: torch.Tensor, dim: int) -> None:
    if not -t.dim() <= dim < t.dim() or t.dim() == 0:
        raise CollectiveError(
            f"pad_across_processes(dim={dim}) got a tensor of shape {tuple(t.shape)}, which has no dimension "
            f"{dim}; pass a dim between {-t.dim()} and {t.dim() - 1}."
        )


def _pad(t: torch.Tensor, d: int, longest: int, pad_index: Any, pad_first: bool) -> torch.Tensor:
    if longest == t.shape[d]:
        return t
    shape = list(t.shape)
    shape[d] = longest
    out = t.new_full(shape, pad_index)
    index = [slice(None)] * t.dim()
    index[d] = slice(longest - t.shape[d], longest) if pad_first else slice(0, t.shape[d])
    out[tuple(index)] = t
    return out


def reduce(data: Any, reduction: Reduction = "sum", scale: float = 1.0) -> Any:
    """Reduce tensors (nested) across ranks: "sum", "mean", "max", "min" or "product"; returns new tensors.

    Every rank gets the same result, reduced in rank order. With N-D parallelism it reduces over the data-
    and context-parallel ranks (each holds a different part of the batch), counting the copies that
    tensor and pipeline parallel ranks hold once. Every rank must pass tensors of the same
    shapes and dtypes (else every rank raises `CollectiveMismatchError` naming them). Example::

        mean_loss = reduce(loss.detach(), "mean")
        worst = reduce(torch.tensor([seconds]), "max")
    """
    runtime = current("reduce")
    if reduction not in REDUCTIONS:
        raise CollectiveError(
            f"reduce(reduction={reduction!r}) must be one of {', '.join(map(repr, REDUCTIONS))}."
        )
    world = runtime.world_size
    if world == 1:
        return tree_map(lambda t: _finish(t.clone(), reduction, 1, scale), data)
    leaves, spec = flatten(data)
    with Collective(
        runtime,
        "reduce",
        call_site(1),
        leaves,
        spec,
        extra=_REDUCTION_ARGUMENTS[reduction],
        policy="small",
        compatible=_REDUCE_CHECK,
    ) as agreement:
        chosen = _representatives(runtime, _LOSS_DIMS)
        if agreement.rows is not None:
            stacks = _exchange.stacked(agreement.rows, agreement.key)
            if chosen is not None:
                stacks = [s[chosen] for s in stacks]
            out = [_exchange.reduce_stacked(s, reduction) for s in stacks]
        else:
            out = _exchange.reduce_native(runtime, agreement, leaves, reduction)
            if chosen is not None:
                out = [_count_copies_once(t, reduction, runtime.world_size // len(chosen)) for t in out]
    counted = world if chosen is None else len(chosen)
    return _exchange.rebuild(data, spec, [_finish(t, reduction, counted, scale) for t in out])


def _count_copies_once(t: torch.Tensor, reduction: str, copies: int) -> torch.Tensor:
    """A reduction over every rank, when each value was held by `copies` ranks (N-D parallelism)."""
    if reduction == "sum" or (reduction == "mean" and not t.is_floating_point()):  # integer means: summed
        return t / copies if t.is_floating_point() else t // copies
    if reduction == "product":
        return t.abs().pow(1.0 / copies).copysign(t) if t.is_floating_point() else t
    return t  # mean over every rank equals the mean over the copies; max and min are unchanged


def _finish(t: torch.Tensor, reduction: str, world: int, scale: float) -> torch.Tensor:
    if reduction == "mean" and not (t.is_floating_point() and world > 1):  # floats: averaged already
        t = t / world
    return t * scale if scale != 1.0 else t


def broadcast(data: Any, from_process: int = 0) -> Any:
    """Send rank `from_process`'s tensors (nested) to every rank, in place; returns `data`.

    Every rank must pass tensors of the same structure, shapes and dtypes (the ones it receives into).
    Example::

        seed = broadcast(torch.tensor([seed]))
    """
    runtime = current("broadcast")
    _check_rank_type("broadcast", from_process)
    if runtime.world_size == 1:
        _check_rank_range("broadcast", from_process, 1)
        return data
    leaves, spec = flatten(data)
    extra = (("from_process", from_process),)
    with Collective(
        runtime,
        "broadcast",
        call_site(1),
        leaves,
        spec,
        extra=extra,
        policy="small",
        compatible=_BROADCAST_CHECK,
    ) as agreement:
        _check_rank_range("broadcast", from_process, runtime.world_size)
        _exchange.broadcast_into(runtime, agreement, leaves, from_process)
    return data


def _check_rank_type(caller: str, rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise CollectiveError(f"{caller}(from_process={rank!r}) needs a rank number (an int).")


def _check_rank_range(caller: str, rank: int, world: int) -> None:
    if not 0 <= rank < world:
        raise CollectiveError(
            f"{caller}(from_process={rank}) names a rank outside the run, which has {world} process"
            f"{'es' if world > 1 else ''} (ranks 0 to {world - 1})."
        )


def broadcast_object_list(objects: list[Any], from_process: int = 0) -> list[Any]:
    """Send rank `from_process`'s list of picklable objects to every rank, in place. Example::

    config = broadcast_object_list([config if is_main_process() else None])[0]
    """
    runtime = current("broadcast_object_list")
    _check_rank_type("broadcast_object_list", from_process)
    if not isinstance(objects, list):
        raise CollectiveError(
            f"broadcast_object_list() fills a list in place; got {type(objects).__name__}. Pass a list with one "
            "slot per object, e.g. [config if is_main_process() else None]."
        )
    if runtime.world_size == 1:
        _check_rank_range("broadcast_object_list", from_process, 1)
        return objects
    sending = runtime.rank == from_process
    data, error = _pickled(objects) if sending else (torch.empty(0, dtype=torch.uint8), None)
    extra = (("from_process", from_process), ("len(objects)", len(objects)))
    with Collective(
        runtime,
        "broadcast_object_list",
        call_site(1),
        [],
        "list",
        extra=extra,
        nbytes=data.numel(),
        error=error,
    ) as agreement:
        _check_rank_range("broadcast_object_list", from_process, runtime.world_size)
        assert agreement.headers is not None
        size = agreement.headers[from_process].nbytes
        payload = _exchange.broadcast_bytes(runtime, data, size, from_process, agreement.device)
    if not sending:
        # unpickled from this job's own rank, as torch.distributed.broadcast_object_list does
        objects[:] = pickle.loads(payload)
    return objects


def wait_for_everyone() -> None:
    """Block until every rank reaches this line. Example: `wait_for_everyone()` before reading a file
    the main process wrote."""
    runtime = current("wait_for_everyone")
    if runtime.world_size > 1:
        barrier(runtime, call_site(1))


def barrier(runtime: Runtime, site: Site, op: str = "wait_for_everyone") -> None:
    """A checked barrier: every rank must be at the same call (an all-gather of 8-byte tags)."""
    with Collective(runtime, op, site, [], OTHER):
        pass


def leave_scope(runtime: Runtime) -> None:
    """The collective every rank runs when it leaves a `distributed()` scope normally, so a rank that
    leaves while others still call collectives is named instead of hanging them."""
    ledger = ledger_of(runtime)
    barrier(runtime, ledger.opened_at or fixed_site("distributed()"), LEAVE_SCOPE)
    ledger.left = True


def set_trigger() -> None:
    """Raise a flag that `check_trigger()` reports on every rank (call it on any rank). Example::

    if not torch.isfinite(loss):
        set_trigger()
    if check_trigger():      # on every rank: True when any rank set it
        break
    """
    current("set_trigger").state.extensions[_TRIGGER] = True


def check_trigger() -> bool:
    """True on every rank when any rank called `set_trigger()` since the last check; resets the flag.

    Every rank must call it at the same point (it is a collective). Example::

        for batch in loader:
            ...
            if early_stopping.should_stop(val_loss):
                set_trigger()
            if check_trigger():
                break
    """
    runtime = current("check_trigger")
    flag = bool(runtime.state.extensions.pop(_TRIGGER, False))
    if runtime.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.uint8, device=runtime.collective_device)
    with Collective(runtime, "check_trigger", call_site(1), [t]) as agreement:
        assert agreement.rows is not None
        return bool(agreement.rows.any())


@contextlib.contextmanager
def split_between_processes(inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
    """Give each rank its contiguous share of a list, tuple, tensor or dict of them.

    Shares differ by at most one item; `apply_padding=True` repeats the last item so all shares are
    equally long (drop the extra results afterwards). Example::

        with split_between_processes(prompts) as my_prompts:
            results = [generate(p) for p in my_prompts]
    """
    runtime = current("split_between_processes")
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
