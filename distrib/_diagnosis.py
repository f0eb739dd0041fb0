"""Stall dumps and the merged diagnosis: which rank is *not* in the collective the others wait in.

When the stall watchdog (`_watchdog.py`) fires, every rank writes a dump: where its scope thread is (the
innermost frame of the user's code and the whole stack), the collective it waits in (if any) and its last
ledger entries. `merged_report(directory)` reads every rank's dump from a directory (`distrib launch`
gives each attempt one through `DISTRIB_DIAGNOSTICS_DIR`) and writes one diagnosis, e.g.::

    distrib: no rank made progress for 300 s (stall_timeout); every rank dumped its state.
      ranks 0, 2, 3 wait in collective #12: gather() at /work/train.py:55
      rank 1 is NOT in that collective: stuck at /work/train.py:40 in train_step
          (its last collective: #11 reduce() at /work/train.py:30)

Files: `rank_<r>.json` per rank (written atomically), and `collected.json` from rank 0 with the dumps
every rank sent through the process group's store (so one directory can name ranks of other machines).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import sysconfig
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from ._ledger import op_call

#: exit status of a process the stall watchdog ended
STALL_EXIT_CODE = 124
_VERSION = 1
_LIBRARY_DIRS = tuple(
    os.path.abspath(p) + os.sep
    for p in {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    | {os.path.dirname(os.path.abspath(__file__))}
)


def _is_library(path: str) -> bool:
    return path.startswith(_LIBRARY_DIRS) or path.startswith("<")


def stack_of(frame: FrameType | None, limit: int = 40) -> list[dict[str, Any]]:
    """A frame's stack, outermost first, as plain data."""
    if frame is None:
        return []
    summary = traceback.extract_stack(frame, limit=limit)
    return [
        {"file": _path(f.filename), "line": f.lineno, "function": f.name, "code": (f.line or "").strip()}
        for f in summary
    ]


def _path(filename: str) -> str:
    return filename if filename.startswith("<") else os.path.abspath(filename)


def innermost_user_frame(stack: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The innermost frame outside the standard library, installed packages and distrib (else the innermost)."""
    for frame in reversed(stack):
        if not _is_library(frame["file"]):
            return frame
    return stack[-1] if stack else None


def make_dump(
    *,
    rank: int,
    world_size: int,
    stall_timeout: float,
    idle_seconds: float,
    thread_id: int,
    in_collective: dict[str, Any] | None,
    last_collectives: list[dict[str, Any]],
    optimizer_steps: int,
) -> dict[str, Any]:
    """This rank's state, as JSON-ready data: the scope thread's stack and every other thread's."""
    frames = sys._current_frames()
    stack = stack_of(frames.get(thread_id))
    user = innermost_user_frame(stack)
    names = {t.ident: t.name for t in threading.enumerate()}
    others = {
        f"{names.get(ident, 'thread')} ({ident})": stack_of(frame, limit=20)
        for ident, frame in frames.items()
        if ident not in (thread_id, threading.get_ident())
    }
    return {
        "version": _VERSION,
        "rank": rank,
        "world_size": world_size,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "stall_timeout": stall_timeout,
        "idle_seconds": round(idle_seconds, 1),
        "in_collective": in_collective,
        "last_collectives": last_collectives,
        "optimizer_steps": optimizer_steps,
        "stuck_at": f"{user['file']}:{user['line']}" if user else "unknown",
        "stuck_function": user["function"] if user else "unknown",
        "stack": stack,
        "threads": others,
    }


def summary(dump: dict[str, Any]) -> dict[str, Any]:
    """A dump small enough for the store: no other threads, the last 12 frames."""
    return {
        **dump,
        "threads": {},
        "stack": dump["stack"][-12:],
        "last_collectives": dump["last_collectives"][-4:],
    }


def write_dump(directory: Path, dump: dict[str, Any], name: str | None = None) -> Path:
    """Write a dump as `rank_<r>.json` (or `name`), atomically: whole or absent."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"rank_{dump['rank']}.json")
    tmp = path.with_suffix(f".{os.getpid()}.partial")
    tmp.write_text(json.dumps(dump, indent=1, default=str))
    os.replace(tmp, path)
    return path


def format_dump(dump: dict[str, Any]) -> str:
    """One rank's dump as text (printed to stderr outside `distrib launch`)."""
    r = dump["rank"]
    lines = [
        f"distrib: rank {r} made no progress for {dump['idle_seconds']:g} s (stall_timeout="
        f"{dump['stall_timeout']:g} s); its state:"
    ]
    current = dump.get("in_collective")
    if current:
        lines.append(
            f"  waiting in collective #{current['seq']}: {_call(current)} for {current['waiting_seconds']:g} s"
        )
    else:
        lines.append(f"  not in a collective; stuck at {dump['stuck_at']} in {dump['stuck_function']}")
    if dump["last_collectives"]:
        lines.append("  last collectives:")
        lines += [
            f"    #{e['seq']} {_call(e)} ({e['outcome']}, {e['seconds']:.3g} s)"
            for e in dump["last_collectives"]
        ]
    lines.append("  stack (most recent call last):")
    lines += _stack_lines(_trimmed(dump["stack"]), "    ")
    hidden = len(dump["stack"]) - len(_trimmed(dump["stack"]))
    if hidden > 0:
        lines.append(f"    ... {hidden} more frames inside distrib and torch (the JSON dump has them)")
    for name, stack in dump.get("threads", {}).items():
        if stack:
            lines.append(f"  thread {name}:")
            lines += _stack_lines(stack[-6:], "    ")
    return "\n".join(lines)


def _call(entry: dict[str, Any]) -> str:
    tensors = f" [{', '.join(entry['tensors'])}]" if entry.get("tensors") else ""
    return f"{op_call(entry['op'])} at {entry['site']}{tensors}"


def _stack_lines(stack: list[dict[str, Any]], indent: str) -> list[str]:
    out = []
    for f in stack:
        out.append(f'{indent}File "{f["file"]}", line {f["line"]}, in {f["function"]}')
        if f.get("code"):
            out.append(f"{indent}  {f['code']}")
    return out


def load_dumps(directory: Path) -> dict[int, dict[str, Any]]:
    """Every rank's dump in `directory`: its own file, else what rank 0 collected for it."""
    dumps: dict[int, dict[str, Any]] = {}
    collected = directory / "collected.json"
    if collected.is_file():
        try:
            for value in json.loads(collected.read_text()).get("dumps", []):
                dumps[int(value["rank"])] = value
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for path in sorted(directory.glob("rank_*.json")):
        try:
            value = json.loads(path.read_text())
            dumps[int(value["rank"])] = value
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return dumps


def merged_report(directory: Path) -> str | None:
    """The merged stall diagnosis of the dumps in `directory`, or None when it holds none.

    `distrib launch` calls this for each attempt's `DISTRIB_DIAGNOSTICS_DIR` and prints the result. Example::

        report = merged_report(Path(os.environ["DISTRIB_DIAGNOSTICS_DIR"]))
        if report:
            print(report, file=sys.stderr)
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    dumps = load_dumps(directory)
    if not dumps:
        return None
    return merge(dumps, directory)


def merge(dumps: dict[int, dict[str, Any]], directory: Path | None = None) -> str:
    """One diagnosis from every rank's dump: the collective most ranks wait in, and each rank that is not
    in it, with where it is stuck."""
    left = {r: d["left"] for r, d in dumps.items() if "left" in d}
    dumps = {r: d for r, d in dumps.items() if "left" not in d}
    world = max([int(d.get("world_size", 0)) for d in dumps.values()] + [max(left, default=-1) + 1])
    timeout = next((d.get("stall_timeout", 0) for d in dumps.values()), 0)
    lines = [
        f"distrib: no rank made progress for {timeout:g} s (stall_timeout); every rank dumped its state."
    ]
    lines += [f"  rank {r} left the run before: {reason}" for r, reason in sorted(left.items())]
    if not dumps:
        return "\n".join(lines)
    waiting = {r: d["in_collective"] for r, d in dumps.items() if d.get("in_collective")}
    if waiting:
        lines += _waiting_lines(dumps, waiting)
    else:
        lines.append("  no rank is inside a distrib collective; where each rank is:")
        lines += [f"  rank {r} {_where(d)}" for r, d in sorted(dumps.items())]
    missing = [r for r in range(world) if r not in dumps and r not in left]
    if missing:
        lines.append(
            f"  {_ranks(missing)} sent no dump (exited, crashed, or stuck where Python cannot run): see their output."
        )
    if directory is not None:
        lines.append(f"  every rank's stacks: {directory}{os.sep}rank_<rank>.json")
    return "\n".join(lines)


def _waiting_lines(dumps: dict[int, dict[str, Any]], waiting: dict[int, dict[str, Any]]) -> list[str]:
    groups = Counter((c["seq"], c["op"], c["site"]) for c in waiting.values())
    (seq, op, site), _ = groups.most_common(1)[0]
    inside = sorted(r for r, c in waiting.items() if (c["seq"], c["op"], c["site"]) == (seq, op, site))
    verb = "waits" if len(inside) == 1 else "wait"
    lines = [f"  {_ranks(inside)} {verb} in collective #{seq}: {op_call(op)} at {site}"]
    for r in sorted(dumps):
        if r in inside:
            continue
        d = dumps[r]
        c = d.get("in_collective")
        if c:
            lines.append(
                f"  rank {r} is in a different collective: #{c['seq']} {op_call(c['op'])} at {c['site']} "
                "(one rank skipped a collective or called an extra one)"
            )
            continue
        lines.append(
            f"  rank {r} is NOT in that collective: stuck at {d['stuck_at']} in {d['stuck_function']}"
        )
        last = d.get("last_collectives") or []
        if last:
            lines.append(f"      (its last collective: #{last[-1]['seq']} {_call(last[-1])})")
        lines += _stack_lines(_from_user_code(d.get("stack", []))[-6:], "      ")
    return lines


def _from_user_code(stack: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stack from the outermost frame of the user's code on (drops the launcher's frames above it)."""
    for i, frame in enumerate(stack):
        if not _is_library(frame["file"]):
            return stack[i:]
    return stack


def _trimmed(stack: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """From the user's outermost frame to one frame past the innermost: the calls into libraries below
    that are distrib's and torch's own."""
    stack = _from_user_code(stack)
    user = [i for i, frame in enumerate(stack) if not _is_library(frame["file"])]
    return stack[: user[-1] + 2] if user else stack


def _where(dump: dict[str, Any]) -> str:
    stack = dump.get("stack") or []
    inner = stack[-1] if stack else {}
    what = ""
    path = str(inner.get("file", ""))
    if "torch" in path and "distributed" in path:
        what = " (inside a torch.distributed call)"
    elif inner.get("function") in ("backward", "run_backward", "_engine_run_backward"):
        what = " (inside backward, where DDP and FSDP synchronise gradients)"
    return f"is at {dump['stuck_at']} in {dump['stuck_function']}{what}"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
