"""The errors raised, on every rank alike, when the ranks disagree about a collective: a table of every
rank's op, call site and inputs, and a sentence on what to change."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from ._ledger import describe_row, op_call
from .errors import CollectiveError, CollectiveMismatchError

if TYPE_CHECKING:
    from ._agreement import Header
    from ._ledger import Key

LEAVE_SCOPE = "leave distributed()"

_HEADLINES = {
    "collective": "the ranks called different collectives",
    "arguments": "the ranks passed different arguments",
    "structure": "the ranks passed different structures (dict keys, nesting or number of tensors)",
    "error": "a rank could not take part",
}
_COLUMN = {"arguments": "arguments", "structure": "structure", "error": "error"}


def build_error(
    key: Key, seq: int, headers: list[Header], described: list[dict[str, Any]], problem: str
) -> CollectiveError:
    """The error every rank raises; `described[r]` is rank r's own account of its call."""
    column = _COLUMN.get(problem, "tensors")
    table = format_table(described, column)
    where = f"{op_call(key.op)} at {key.site}"
    if problem == "dims":
        return CollectiveError(
            f"{where} (collective #{seq} on every rank): a tensor has more than 8 dimensions, which collectives "
            f"cannot describe; reshape it first.\n{table}"
        )
    headline = _HEADLINES.get(problem, problem).rstrip(".")
    hint = _hint(problem, described)
    error_type = CollectiveError if problem == "error" else CollectiveMismatchError
    return error_type(
        f"{where} (collective #{seq} on every rank): {headline}.\n{table}" + (f"\n{hint}" if hint else "")
    )


def format_table(described: list[dict[str, Any]], column: str) -> str:
    """One row per rank: rank, collective, call site, and the column that shows the difference."""
    header = ["rank", "collective", "call site", column]
    rows = [header]
    for rank, d in enumerate(described):
        value = d.get(column)
        if isinstance(value, list):
            value = ", ".join(value) if value else "-"
        rows.append([str(rank), d["op"], d["site"], str(value or "-")])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  " + "  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(r)) for r in rows
    )


def _hint(problem: str, described: list[dict[str, Any]]) -> str:
    if problem == "collective":
        return _collective_hint(described)
    if problem == "arguments":
        return "Every rank must pass the same arguments to a collective."
    if problem == "structure":
        return "Every rank must pass the same structure: the same dict keys, nesting and number of tensors."
    if problem == "error":
        errors = "; ".join(f"rank {r}: {d['error']}" for r, d in enumerate(described) if d.get("error"))
        return f"The failure: {errors}."
    return ""


def _collective_hint(described: list[dict[str, Any]]) -> str:
    calls = [(d["op"], d["site"]) for d in described]
    counts = Counter(calls)
    common, count = counts.most_common(1)[0]
    leavers = [r for r, d in enumerate(described) if d["op"] == LEAVE_SCOPE]
    lines = []
    if len({op for op, _ in calls}) == 1 and not leavers:
        op = op_call(calls[0][0])
        return (
            f"Every rank called {op}, but from different lines. If that is on purpose (the ranks take different "
            f"branches), make the call from one line, e.g. `config = broadcast_object_list([config if "
            f"is_main_process() else None])[0]`; otherwise a rank skipped one {op} and called another."
        )
    if leavers:
        others = [r for r in range(len(described)) if r not in leavers]
        waiting = described[others[0]] if others else described[0]
        lines.append(
            f"{_ranks(leavers)} left the distributed() scope (returned or finished early) while "
            f"{_ranks(others)} called {op_call(waiting['op'])} at {waiting['site']}."
        )
    elif count > len(calls) - count:  # a majority: the others are the odd ones out
        odd = [r for r, call in enumerate(calls) if call != common]
        for r in odd:
            lines.append(
                f"rank {r} did not call {op_call(common[0])} at {common[1]}; it called {op_call(calls[r][0])} at "
                f"{calls[r][1]}."
            )
    else:
        lines.append(
            "The ranks are at different collectives: one of them skipped a collective or called an extra one."
        )
    lines.append(
        "Every rank must call the same collectives in the same order; a collective inside a branch that only "
        "some ranks take (such as `if rank == 0:`) hangs or corrupts the others."
    )
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks))


def describe_shapes(headers: list[Header], index: int) -> str:
    """`rank 0: float32[2, 3], rank 1: float32[2, 4]` for tensor `index`."""
    return ", ".join(f"rank {r}: {describe_row(*h.tensors[index])}" for r, h in enumerate(headers))
