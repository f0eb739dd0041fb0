"""The collective ledger: every collective that goes through distrib, numbered and described, on every rank.

Each entry holds the collective's sequence number, its op, the shapes and dtypes it was given and the
user's call site (`path/to/file.py:LINE`). The ledger also holds what the ranks have *agreed* on so far
(see `_agreement.py`): because every rank updates that part only from information all ranks share, it
is identical on every rank, which is what lets a collective's message size be chosen without a separate
exchange.

Costs per call: one `sys._getframe` for the call site (then a dict lookup by code object and line), one
dict lookup for the call's key (op, site, structure, shapes, dtypes), and a tuple appended to a bounded
deque. Nothing is formatted until a report needs it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import sys
import time
from collections.abc import Mapping
from types import CodeType, FrameType
from typing import Any

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_MAX_SITES = 10_000
_MAX_KEYS = 4_096
#: how many finished collectives each rank remembers for reports
KEEP = 64


def stable_id(*parts: Any) -> int:
    """A 62-bit number that is the same in every process for the same `repr` (Python's `hash` is not)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


class Site:
    """Where a collective was called: file, line and function of the user's code."""

    __slots__ = ("function", "ident", "line", "path")

    def __init__(self, path: str, line: int, function: str) -> None:
        self.path = path
        self.line = line
        self.function = function
        # the base name, not the full path: ranks on other machines may run the same file from elsewhere
        self.ident = stable_id(os.path.basename(path), function, line)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"

    def describe(self) -> str:
        return f"{self.path}:{self.line} in {self.function}"

    def __repr__(self) -> str:
        return f"Site({self.describe()!r})"


_SITES: dict[tuple[CodeType, int], Site] = {}


def call_site(depth: int = 1) -> Site:
    """The call site `depth` frames above the caller of this function (1: the caller's caller).

    One `sys._getframe` per call; a site is built once per code object and line. A frame inside distrib
    itself (an internal caller that passed no site) is skipped by walking up to the user's frame, and is
    not cached, because one internal line serves many user sites.
    """
    frame = sys._getframe(depth + 1)
    key = (frame.f_code, frame.f_lineno)
    site = _SITES.get(key)
    if site is not None:
        return site
    if not frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        if len(_SITES) >= _MAX_SITES:
            _SITES.clear()
        site = _SITES[key] = _site_of(frame)
        return site
    return _site_of(user_frame(frame))


def _site_of(frame: FrameType) -> Site:
    code = frame.f_code
    return Site(os.path.abspath(code.co_filename), frame.f_lineno, getattr(code, "co_qualname", code.co_name))


def user_frame(frame: FrameType) -> FrameType:
    """The first frame at or above `frame` that is not distrib's own code (or `frame` if there is none)."""
    found: FrameType | None = frame
    while found is not None and found.f_code.co_filename.startswith(_PACKAGE_DIR):
        found = found.f_back
    return found if found is not None else frame


def fixed_site(description: str) -> Site:
    """A site for collectives distrib starts itself (the straggler report, leaving a scope)."""
    return Site("<distrib>", 0, description)


# -- the structure of a collective's input --------------------------------------------------------------

TENSOR = "T"
OTHER = "-"


def flatten(data: Any) -> tuple[list[torch.Tensor], Any]:
    """The tensors of `data` in `tree_map` order, and a hashable description of its structure (types and
    mapping keys), so ranks can compare structures without comparing values."""
    if isinstance(data, torch.Tensor):
        return [data], TENSOR
    leaves: list[torch.Tensor] = []
    return leaves, _spec(data, leaves)


def _spec(obj: Any, out: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return TENSOR
    if isinstance(obj, Mapping):
        return ("dict", tuple(obj.keys()), tuple(_spec(v, out) for v in obj.values()))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return (type(obj).__name__, tuple(_spec(v, out) for v in obj))
    if isinstance(obj, (list, tuple)):
        return ("list" if isinstance(obj, list) else "tuple", tuple(_spec(v, out) for v in obj))
    return OTHER


def describe_structure(spec: Any) -> str:
    """`spec` in words, e.g. "dict with keys ['a', 'b']" or "tuple of 2"."""
    if spec == TENSOR:
        return "a tensor"
    if spec == OTHER:
        return "no tensors"
    if spec[0] == "dict":
        inner = [describe_structure(s) for s in spec[2]]
        nested = "" if all(s == "a tensor" for s in inner) else f" ({'; '.join(inner)})"
        return f"dict with keys {list(spec[1])!r}{nested}"
    return f"{spec[0]} of {len(spec[1])}"


def op_call(op: str) -> str:
    """How an op reads in a sentence: `gather()`, `leave distributed()`."""
    return op if op.endswith(")") else f"{op}()"


def describe_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    """`float32[64, 10]`."""
    return f"{str(dtype).replace('torch.', '')}[{', '.join(map(str, shape))}]"


#: dtypes by the code a header carries (an unknown dtype is -1)
DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
]  # fmt: skip
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}


def describe_row(code: int, shape: tuple[int, ...]) -> str:
    """A tensor described by its header row: `float32[2, 3]`."""
    if 0 <= code < len(DTYPES):
        return describe_tensor(DTYPES[code], shape)
    return f"other-dtype[{', '.join(map(str, shape))}]"


# -- keys: one per distinct (op, site, structure, shapes and dtypes, arguments) -----------------------


# In every 16-bit half-word of a tag: sign bit 0, top exponent bit 0, next bit 1. Seen as float16, bf16,
# float32 or float64 elements, the tag is then a positive normal number (never NaN, an infinity, -0 or a
# subnormal), so comparing values compares bits and `torch.equal` needs no integer view.
_TAG_CLEAR = 0xC000C000C000C000
_TAG_SET = 0x2000200020002000


def tag_value(ident: int) -> int:
    """The 8-byte tag of a key: its ident with the bits above forced (52 bits of it remain)."""
    return (ident & ~_TAG_CLEAR & (2**64 - 1)) | _TAG_SET


#: dtypes that gloo and NCCL both move and whose element size divides the 8-byte tag
_UNITS = {
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
}


def packing_unit(dtypes: set[torch.dtype]) -> torch.dtype:
    """The dtype a payload travels as: the tensors' own dtype when they share one the backends support
    (no dtype views to pack or unpack), else bytes (mixed dtypes, bool, complex, int16, float8, ...)."""
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if dtype in _UNITS:
            return dtype
    return torch.uint8


class Key:
    """Everything about a collective call that must be the same on every rank, with its packed layout.

    Built once per distinct call and cached; `ident` is the same on every rank for the same key. The
    payload travels as one flat tensor of `unit` dtype: each tensor at `offset`, `count` units long,
    followed by an 8-byte tag (the key's `ident`) on the fast path.
    """

    __slots__ = (
        "extra",
        "fast",
        "ident",
        "last_tags",
        "layout",
        "nbytes",
        "op",
        "payload",
        "sig",
        "site",
        "spec",
        "tag_device",
        "tags",
        "template",
        "unit",
        "width",
    )

    def __init__(
        self, op: str, site: Site, spec: Any, sig: tuple[Any, ...], extra: tuple[Any, ...], payload: bool
    ) -> None:
        self.op = op
        self.site = site
        self.spec = spec
        self.sig = sig
        self.extra = extra
        self.payload = payload
        self.unit = unit = packing_unit({d for d, _ in sig}) if payload else torch.uint8
        layout = []
        offset = 0
        if payload:
            for dtype, shape in sig:
                count = dtype.itemsize * _numel(shape) // unit.itemsize
                layout.append((dtype, shape, offset, count))
                offset += count
        #: (dtype, shape, offset, count) per tensor, offsets and counts in `unit` elements
        self.layout: tuple[tuple[torch.dtype, torch.Size, int, int], ...] = tuple(layout)
        self.width = offset
        self.nbytes = offset * unit.itemsize
        self.ident = stable_id(
            op, site.ident, repr(spec), [(str(d), tuple(s)) for d, s in sig], repr(extra), payload
        )
        self.fast = False  # set by the agreement protocol from the op and the payload size
        self.tags: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tag_device: torch.device | None = None  # the device of the last tags asked for, and them
        self.last_tags: tuple[torch.Tensor, torch.Tensor] | None = None
        self.template: list[int] | None = None  # the header row without its per-call fields (_agreement.py)

    def tag(
        self, device: torch.device, world_size: int, unit: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This key's 8-byte tag as `unit` elements (default: its own unit) on `device`, and the tags of
        every rank when all agree, `[world_size, 8 // unit size]`."""
        if unit is None and device == self.tag_device:
            return self.last_tags  # type: ignore[return-value]
        unit = unit or self.unit
        found = self.tags.get((device, unit))
        if found is None:
            tag = torch.tensor([tag_value(self.ident)], dtype=torch.int64).view(unit).to(device)
            expected = tag.repeat(world_size).view(world_size, -1)
            found = self.tags[(device, unit)] = (tag, expected)
        if unit is self.unit:
            self.tag_device, self.last_tags = device, found
        return found

    def describe_tensors(self) -> list[str]:
        return [describe_tensor(dtype, tuple(shape)) for dtype, shape in self.sig]


def _numel(shape: torch.Size) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- the ledger ----------------------------------------------------------------------------------------


class Ledger:
    """One process group's collectives as this rank saw them, and what the ranks agreed on.

    The scope thread writes it; the stall watchdog reads `current`, `completed` and `entries` from its own
    thread (single reads and `list()` copies, atomic under the GIL).
    """

    def __init__(self, rank: int, world_size: int, *, debug: bool = False, keep: int = KEEP) -> None:
        self.rank = rank
        self.world_size = world_size
        self.debug = debug
        self.seq = 0  # collectives begun
        self.completed = 0
        #: finished collectives: (seq, key, start time, seconds, outcome)
        self.entries: collections.deque[tuple[int, Key, float, float, str]] = collections.deque(maxlen=keep)
        #: the collective in progress: (seq, key, start time), or None
        self.current: tuple[int, Key, float] | None = None
        self.comm_seconds = 0.0  # time spent inside collectives (for the straggler report)
        self.predicted: Key | None = None  # agreed: the key the next collective is expected to have
        self._follows: dict[int, Key | None] = {}  # agreed: key ident -> the key that came next last time
        self._last = 0  # agreed: ident of the last key every rank had, 0 after a disagreement
        self._keys: dict[tuple[Any, ...], Key] = {}
        self.opened_at: Site | None = None
        self.left = False
        self.gather_into: Any = None  # the group's all-gather into one tensor (_agreement.py picks it)

    def key(
        self, op: str, site: Site, spec: Any, sig: tuple[Any, ...], extra: tuple[Any, ...], payload: bool
    ) -> Key | None:
        """The cached key for this call, or None when it has not been seen yet (build it with `add`)."""
        return self._keys.get((op, site, spec, sig, extra, payload))

    def add(self, key: Key) -> Key:
        if len(self._keys) >= _MAX_KEYS:
            self._keys.clear()
        self._keys[(key.op, key.site, key.spec, key.sig, key.extra, key.payload)] = key
        return key

    def begin(self, key: Key) -> int:
        self.seq += 1
        self.current = (self.seq, key, time.monotonic())
        return self.seq

    def settle(self, agreed: Key | None) -> None:
        """Record what every rank agreed on: the key all ranks had, or None when they differed.

        Called at the point where every rank holds the same information, before any local work that
        could fail on one rank only, so the agreed state never differs between ranks.
        """
        if len(self._follows) >= _MAX_KEYS:
            self._follows.clear()
        self._follows[self._last] = agreed
        self._last = agreed.ident if agreed is not None else 0
        self.predicted = self._follows.get(self._last)

    def end(self, outcome: str) -> None:
        current = self.current
        if current is None:
            return
        seq, key, start = current
        seconds = time.monotonic() - start
        self.entries.append((seq, key, start, seconds, outcome))
        self.comm_seconds += seconds
        self.completed += 1
        self.current = None

    def last_entries(self, count: int = 16) -> list[dict[str, Any]]:
        """The most recent finished collectives, oldest first, as plain data (for dumps and reports)."""
        rows = list(self.entries)[-count:]
        return [
            {
                "seq": seq,
                "op": key.op,
                "site": str(key.site),
                "function": key.site.function,
                "tensors": key.describe_tensors(),
                "seconds": round(seconds, 6),
                "outcome": outcome,
            }
            for seq, key, _, seconds, outcome in rows
        ]

    def in_progress(self) -> dict[str, Any] | None:
        """The collective this rank is inside now, as plain data, or None."""
        current = self.current
        if current is None:
            return None
        seq, key, start = current
        return {
            "seq": seq,
            "op": key.op,
            "site": str(key.site),
            "function": key.site.function,
            "tensors": key.describe_tensors(),
            "waiting_seconds": round(time.monotonic() - start, 3),
        }
