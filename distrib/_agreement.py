"""How the ranks agree that they are in the same collective, at (almost) no cost per call.

Every distrib collective is an all-gather whose message size every rank derives from what all ranks
already agree on, so the message sizes can never differ between ranks (with gloo, a size mismatch
aborts the receiving process; with NCCL it corrupts memory or hangs):

* **fast path** (one collective): the ledger predicts the next call from the agreed history (the key
  that followed the previous one last time). Every rank sends the predicted call's payload size plus an
  8-byte tag naming its own call (op, call site, structure, shapes, dtypes, arguments). A rank whose
  call differs from the prediction sends zeros and its own tag. When every tag is the predicted one, the
  payload is the result; otherwise every rank saw the same tags and falls through to
* **slow path**: a fixed-size header exchange (op, call site, sequence number, structure, shapes and
  dtypes of the first tensors), then a data exchange sized from those headers. Used for the first call
  of a kind, after a misprediction, for payloads whose size varies (objects, ragged gathers), and for
  every call in debug mode.

When the headers disagree, every rank raises `CollectiveMismatchError` with a table of every rank's op,
call site and tensors (exchanged as text, again with sizes agreed first). When a peer closed its
connection, the error names the rank and why it left, from the record it put in the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist

from . import _store
from ._ledger import DTYPE_CODE, TENSOR, Key, Ledger, Site, describe_structure, op_call, stable_id
from ._mismatch import build_error
from ._runtime import Runtime
from .errors import CollectiveError, CollectiveMismatchError

# bound before any debug-mode wrapping of torch.distributed: the protocol's own calls are never checked
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gatherer() -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """The default group's own all-gather into one tensor, called without torch.distributed's Python
    wrapper (whose group lookups and checks cost about a third of a small gather's Python time and are
    redundant here); the public function where the group does not have it."""
    try:
        group = dist.distributed_c10d._get_default_group()
    except (RuntimeError, ValueError, AttributeError):
        return _ALL_GATHER_SINGLE
    method = getattr(group, "all_gather_single", None) or getattr(group, "_allgather_base", None)
    if method is None:
        return _ALL_GATHER_SINGLE
    options = getattr(dist.distributed_c10d, "AllgatherOptions", None)
    if options is None:
        return _ALL_GATHER_SINGLE
    options = options()

    def gather_into(recv: torch.Tensor, send: torch.Tensor) -> None:
        method(recv, send, options).wait()

    return gather_into


MAGIC = 0x64697374726962
MAX_DIMS = 8
ROWS_IN_HEADER = 4
_FIXED = 10  # magic, seq, op, site, spec, extra, key, count, nbytes, flags
ROW = 2 + MAX_DIMS  # dtype code, ndim, dims
HEADER = _FIXED + ROWS_IN_HEADER * ROW
FLAG_TOO_MANY_DIMS = 1
FLAG_LOCAL_ERROR = 2
#: reduce and broadcast travel as an all-gather while every rank receives at most this much
SMALL_BYTES = 1 << 20
SMALL_WORLD = 64


Policy = Literal["always", "small", "never"]
Check = Callable[[list["Header"]], "str | None"]
_PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|NCCL communicator was aborted"
    r"|remote process exited|Socket closed"
)


def ledger_of(runtime: Runtime) -> Ledger:
    """The runtime's ledger (created with the scope; created here for a runtime built by hand)."""
    ledger = runtime.state.extensions.get("ledger")
    if ledger is None:
        ledger = runtime.state.extensions["ledger"] = Ledger(
            runtime.rank, runtime.world_size, debug=runtime.settings.debug_collectives
        )
    return ledger  # type: ignore[no-any-return]


class Header:
    """One rank's header, decoded."""

    __slots__ = ("count", "extra", "flags", "key", "nbytes", "op", "seq", "site", "spec", "tensors")

    def __init__(self, row: list[int]) -> None:
        (
            _,
            self.seq,
            self.op,
            self.site,
            self.spec,
            self.extra,
            self.key,
            self.count,
            self.nbytes,
            self.flags,
        ) = row[:_FIXED]
        self.tensors: list[tuple[int, tuple[int, ...]]] = []
        self.add_rows(row[_FIXED:], min(self.count, ROWS_IN_HEADER))

    def add_rows(self, values: list[int], count: int) -> None:
        for i in range(count):
            code, ndim, *dims = values[i * ROW : (i + 1) * ROW]
            self.tensors.append((code, tuple(dims[: min(ndim, MAX_DIMS)])))


class Agreement:
    """What every rank agreed on for one collective.

    `rows` is a `[world_size, key.width]` tensor of `key.unit` elements, every rank's payload, when all
    ranks had the same key and the payload travelled; otherwise `headers` holds every rank's header and
    the op moves its data itself (different shapes, objects, large reductions).
    """

    __slots__ = ("device", "headers", "key", "rows")

    def __init__(
        self, key: Key, device: torch.device, rows: torch.Tensor | None, headers: list[Header] | None
    ) -> None:
        self.key = key
        self.device = device
        self.rows = rows
        self.headers = headers


class Collective:
    """One rank's side of one collective: `with Collective(runtime, ...) as agreement: ...`.

    Entering agrees with the other ranks (raising `CollectiveMismatchError` on every rank when they
    differ); leaving records the outcome in the ledger.
    """

    __slots__ = ("compatible", "error", "extra", "leaves", "ledger", "nbytes", "op", "payload", "policy", "runtime", "site", "spec")  # fmt: skip

    def __init__(
        self,
        runtime: Runtime,
        op: str,
        site: Site,
        leaves: list[torch.Tensor],
        spec: Any = TENSOR,
        *,
        extra: tuple[tuple[str, Any], ...] = (),
        payload: bool = True,
        policy: Policy = "always",
        nbytes: int | None = None,
        error: str | None = None,
        compatible: Check | None = None,
    ) -> None:
        self.runtime = runtime
        self.ledger = ledger_of(runtime)
        self.op = op
        self.site = site
        self.leaves = leaves
        self.spec = spec
        self.extra = extra
        self.payload = payload and nbytes is None
        self.policy: Policy = "never" if nbytes is not None else policy
        self.nbytes = nbytes  # a byte payload whose size may differ per rank (pickled objects)
        self.error = error  # a local failure every rank must hear about
        self.compatible = compatible

    def __enter__(self) -> Agreement:
        ledger = self.ledger
        key = self._key()
        ledger.begin(key)
        try:
            return self._agree(key)
        except BaseException as exc:
            ledger.end(f"failed: {type(exc).__name__}")
            raise

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.ledger.end("ok" if exc_type is None else f"failed: {exc_type.__name__}")

    def _key(self) -> Key:
        leaves = self.leaves
        sig = (
            ((leaves[0].dtype, leaves[0].shape),)
            if len(leaves) == 1
            else tuple([(t.dtype, t.shape) for t in leaves])
        )
        ledger = self.ledger
        key = ledger.key(self.op, self.site, self.spec, sig, self.extra, self.payload)
        if key is None:
            key = Key(self.op, self.site, self.spec, sig, self.extra, self.payload)
            key.fast = _fast_allowed(self.policy, key.nbytes, ledger.world_size)
            key = ledger.add(key)
        return key

    def _agree(self, key: Key) -> Agreement:
        ledger = self.ledger
        device = self.leaves[0].device if self.leaves else self.runtime.collective_device
        predicted = ledger.predicted
        if predicted is not None and predicted.fast and not ledger.debug:
            rows = self._fast(predicted, key, device)
            if rows is not None:
                ledger.settle(key)
                return Agreement(key, device, rows, None)
        headers = self._headers(key, device)
        problem = _disagreement(headers) or (self.compatible(headers) if self.compatible else None)
        if problem is not None:
            ledger.settle(None)
            raise self._mismatch(key, headers, problem, device)
        uniform = all(h.key == key.ident and h.nbytes == headers[0].nbytes for h in headers)
        ledger.settle(key if uniform else None)
        if uniform and key.fast:  # the first call of its kind: move the payload now, as the fast path would
            return Agreement(key, device, self._payload_rows(key, device), None)
        return Agreement(key, device, None, headers)

    # -- the fast path -------------------------------------------------------------------------------
    def _fast(self, predicted: Key, key: Key, device: torch.device) -> torch.Tensor | None:
        """One all-gather of the predicted payload size plus the tags; the payload rows when every rank
        had the predicted call, else None (every rank saw the same tags, so every rank returns None)."""
        world = self.ledger.world_size
        tag, expected = predicted.tag(device, world)
        if key is predicted or key.ident == predicted.ident:
            pieces = self._pieces(key, device)
            send = torch.cat([*pieces, tag]) if pieces else tag
        else:  # this rank's call differs: the predicted size, zeros, and its own tag
            mine, _ = key.tag(device, world, predicted.unit)
            send = torch.cat([torch.zeros(predicted.width, dtype=predicted.unit, device=device), mine])
        recv = all_gather_flat(self.ledger, send)
        width, n = predicted.width, send.numel()
        # strided views of the flat result, no intermediate [world, n] view: this runs on every call
        if torch.equal(recv.as_strided((world, n - width), (n, 1), width), expected):
            return recv.as_strided((world, width), (n, 1))
        return None

    def _pieces(self, key: Key, device: torch.device) -> list[torch.Tensor]:
        """The tensors as flat `key.unit` tensors on `device` (views where possible)."""
        if not self.payload:
            return []
        leaves = self.leaves
        if key.unit is torch.uint8:
            return [as_bytes(t, device) for t in leaves]
        if len(leaves) == 1:  # the device was taken from this tensor
            t = leaves[0]
            return [(t.detach() if t.requires_grad else t).reshape(-1)]
        return [flat(t, device) for t in leaves]

    def _payload_rows(self, key: Key, device: torch.device) -> torch.Tensor:
        pieces = self._pieces(key, device)
        if not pieces:
            return torch.empty(self.ledger.world_size, 0, dtype=torch.uint8, device=device)
        return all_gather_rows(self.ledger, pieces[0] if len(pieces) == 1 else torch.cat(pieces))

    # -- the slow path -------------------------------------------------------------------------------
    def _headers(self, key: Key, device: torch.device) -> list[Header]:
        row = header_row(key, self.ledger.seq, self.nbytes, self._flags())
        table = all_gather_rows(self.ledger, torch.tensor(row, dtype=torch.int64, device=device)).tolist()
        headers = [Header(r) for r in table]
        counts = {h.count for h in headers}
        if len(counts) == 1 and (count := counts.pop()) > ROWS_IN_HEADER:
            rest = [v for t in self.leaves[ROWS_IN_HEADER:] for v in tensor_row(t.dtype, t.shape)]
            more = all_gather_rows(self.ledger, torch.tensor(rest, dtype=torch.int64, device=device)).tolist()
            for h, values in zip(headers, more):
                h.add_rows(values, count - ROWS_IN_HEADER)
        return headers

    def _flags(self) -> int:
        flags = FLAG_LOCAL_ERROR if self.error else 0
        if any(t.dim() > MAX_DIMS for t in self.leaves):
            flags |= FLAG_TOO_MANY_DIMS
        return flags

    def _mismatch(
        self, key: Key, headers: list[Header], problem: str, device: torch.device
    ) -> CollectiveError:
        mine = {
            "op": key.op,
            "site": key.site.describe(),
            "tensors": key.describe_tensors(),
            "structure": describe_structure(key.spec),
            "arguments": ", ".join(f"{name}={value!r}" for name, value in key.extra),
            "error": self.error,
        }
        described = [json.loads(text) for text in exchange_text(self.ledger, json.dumps(mine), device)]
        return build_error(key, self.ledger.seq, headers, described, problem)


def _fast_allowed(policy: Policy, nbytes: int, world_size: int) -> bool:
    if policy == "always":
        return True
    return policy == "small" and world_size <= SMALL_WORLD and nbytes * world_size <= SMALL_BYTES


def _disagreement(headers: list[Header]) -> str | None:
    """What the ranks disagree on, in the order that explains it best: the collective itself (op, call
    site, sequence), its arguments, the structure of its input, a local failure; None when they agree."""
    first = headers[0]
    if any((h.op, h.site, h.seq) != (first.op, first.site, first.seq) for h in headers):
        return "collective"
    if any(h.extra != first.extra for h in headers):
        return "arguments"
    if any(h.spec != first.spec or h.count != first.count for h in headers):
        return "structure"
    if any(h.flags & FLAG_LOCAL_ERROR for h in headers):
        return "error"
    if any(h.flags & FLAG_TOO_MANY_DIMS for h in headers):
        return "dims"
    return None


# -- messages ---------------------------------------------------------------------------------------


def tensor_row(dtype: torch.dtype, shape: torch.Size) -> list[int]:
    dims = list(shape)[:MAX_DIMS]
    return [DTYPE_CODE.get(dtype, -1), len(shape), *dims, *([0] * (MAX_DIMS - len(dims)))]


def header_row(key: Key, seq: int, nbytes: int | None, flags: int) -> list[int]:
    template = key.template
    if template is None:
        rows = [v for dtype, shape in key.sig[:ROWS_IN_HEADER] for v in tensor_row(dtype, shape)]
        rows += [0] * (ROWS_IN_HEADER * ROW - len(rows))
        template = key.template = [
            MAGIC, 0, stable_id(key.op), key.site.ident, stable_id(repr(key.spec)), stable_id(repr(key.extra)),
            key.ident, len(key.sig), key.nbytes, 0, *rows,
        ]  # fmt: skip
    row = list(template)
    row[1] = seq
    row[8] = key.nbytes if nbytes is None else nbytes
    row[9] = flags
    return row


def flat(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """`t` as a flat tensor (on `device` when given), without autograd: a view when it is contiguous."""
    if t.requires_grad:
        t = t.detach()
    if device is not None and t.device != device:
        t = t.to(device)
    return t.reshape(-1)


def as_bytes(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """`t`'s elements as a flat uint8 tensor (on `device` when given): a view when it is contiguous."""
    return flat(t, device).view(torch.uint8)


def from_bytes(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A tensor of `dtype` and `shape` from a 1-D uint8 slice (copied when its offset is misaligned)."""
    if data.storage_offset() % dtype.itemsize:
        data = data.clone()
    return data.view(dtype).view(shape)


def all_gather_rows(ledger: Ledger, send: torch.Tensor) -> torch.Tensor:
    """Every rank's `send` (same size everywhere), as `[world_size, send.numel()]`."""
    return all_gather_flat(ledger, send).view(ledger.world_size, -1)


def all_gather_flat(ledger: Ledger, send: torch.Tensor) -> torch.Tensor:
    """Every rank's `send` (same size everywhere), one after the other in one flat tensor."""
    recv = torch.empty(ledger.world_size * send.numel(), dtype=send.dtype, device=send.device)
    gather_into = ledger.gather_into
    if gather_into is None:
        gather_into = ledger.gather_into = _gatherer()
    try:
        gather_into(recv, send)
    except RuntimeError as exc:
        raise peer_failure(ledger, exc) from exc
    return recv


def exchange_text(ledger: Ledger, text: str, device: torch.device) -> list[str]:
    """Every rank's `text`: lengths first, then the bytes padded to the longest."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    sizes = all_gather_rows(ledger, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    lengths = [int(n) for n in sizes.view(-1).tolist()]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    rows = all_gather_rows(ledger, padded).cpu()
    return [bytes(rows[r, :n].tolist()).decode(errors="replace") for r, n in enumerate(lengths)]


def peer_failure(ledger: Ledger, exc: BaseException) -> BaseException:
    """A clear error when a peer went away during a collective (gloo reports a closed connection): a
    table of this rank's collective and of every rank that left, with the reason it gave."""
    if not _PEER_GONE.search(str(exc)):
        return exc
    current = ledger.current
    rows = [["rank", "state", "call site"]]
    rows.append([str(ledger.rank), "waits here", current[1].site.describe() if current else "-"])
    records = _store.get_many(_store.group_store(), [f"left/{r}" for r in range(ledger.world_size)])
    gone = sorted((v for v in records.values() if v.get("rank") != ledger.rank), key=lambda v: v["rank"])
    rows += [[str(v["rank"]), f"left the run: {v['reason']}", v.get("last") or "-"] for v in gone]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    table = "\n".join(f"  {r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in rows)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = (
        f"{op_call(current[1].op)} at {current[1].site} (collective #{current[0]})"
        if current
        else "a collective"
    )
    if gone:
        ranks = ", ".join(str(v["rank"]) for v in gone)
        why = f"rank{'s' if len(gone) > 1 else ''} {ranks} left the run"
    else:
        why = "another rank closed its connection: it crashed, was killed, or left without a word (see its output)"
    return CollectiveMismatchError(
        f"{where} cannot complete on rank {ledger.rank}: {why}.\n{table}\n"
        f"Every rank must stay in the run and call the same collectives. (backend: {first_line})"
    )
