"""Shared by the benchmarks: 2-process launches, interleaved timing rounds, statistics and JSON output.

The method, the same for every overhead benchmark:

- each *launch* starts fresh worker processes (`python -m torch.distributed.run`, gloo) with one thread
  each and fixed glibc malloc thresholds, so that page-fault behaviour does not differ between processes;
- inside a launch every variant (raw PyTorch, distrib, Accelerate) is built once, then the variants run in
  *rounds*: one round of each, in an order that rotates every round, after warm-up rounds that are not
  counted; every round starts after a barrier and is timed on rank 0 with `time.perf_counter`;
- a variant's *ratio* is the median, over all rounds of all launches, of its round time divided by the raw
  variant's time in the same round (neighbours in time see the same machine load); the spread is the
  25th-75th percentile of those paired ratios and the range of the per-launch medians.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "raw"

# glibc reads these when a process starts: fixed values stop its adaptive mmap threshold from giving two
# identical processes different page-fault counts per step
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20)}


def have_accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env() -> dict[str, str]:
    """The environment of every benchmark worker."""
    env = dict(os.environ)
    env.update(MALLOC_ENV)
    env.update({"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"})
    # the workers import the checkout's distrib even when it is not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for key in [k for k in env if k.startswith("DISTRIB_")]:
        del env[key]  # a stray launcher setting would change what the distrib variant measures
    return env


def launch(script: Path, config: dict[str, Any], nproc: int = 2, timeout: float = 900) -> dict[str, Any]:
    """Run `script --worker` on `nproc` processes with `config`; return what rank 0 wrote.

    A launch whose result was written but that then failed while exiting counts (the exit code is kept
    in the result); a launch without a result is tried once more, then raises with its output.
    """
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                str(script), "--worker", "--out", str(out), "--config", json.dumps(config),
            ]  # fmt: skip
            proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout)
            if out.exists():
                return {**json.loads(out.read_text()), "exit_code": proc.returncode}
            message = (
                f"benchmark launch failed (exit {proc.returncode}, attempt {attempt}): {' '.join(cmd)}\n"
                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
            )
            print(message, file=sys.stderr, flush=True)
    raise RuntimeError(message)


def interleave(
    variants: dict[str, Callable[[], int]],
    rounds: int,
    warmup: int,
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, list[float]]]:
    """Run each variant's round `warmup + rounds` times, rotating the order every round.

    A round function runs its steps and returns how many it ran. Per round and step, both the wall time
    and this process's CPU time are recorded (`{"wall": {variant: [...]}, "cpu": {...}}`); warm-up rounds
    are run but not recorded. CPU time leaves out the time a process waits for a core or for its peer,
    so it is far less sensitive to other work on a shared machine.
    """
    names = list(variants)
    gc.collect()
    gc.freeze()  # what exists now is never collected again: the collection before each round stays cheap
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            steps = variants[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if r >= warmup:
                times["wall"][name].append(wall / steps)
                times["cpu"][name].append(cpu / steps)
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(launches: list[dict[str, list[float]]], unit_scale: float = 1e6) -> dict[str, dict[str, Any]]:
    """Per variant: median time (µs by default), spread, and the ratio to the raw variant's paired rounds."""
    names = list(launches[0])
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        times = [t * unit_scale for launch in launches for t in launch[name]]
        entry: dict[str, Any] = {
            "median": statistics.median(times),
            "p25": _quantile(times, 0.25),
            "p75": _quantile(times, 0.75),
            "samples": len(times),
        }
        if BASELINE in names:
            paired = [[v / b for v, b in zip(launch[name], launch[BASELINE])] for launch in launches]
            flat = [r for per_launch in paired for r in per_launch]
            entry["ratio"] = statistics.median(flat)
            entry["ratio_p25"] = _quantile(flat, 0.25)
            entry["ratio_p75"] = _quantile(flat, 0.75)
            entry["launch_ratios"] = [statistics.median(p) for p in paired]
        summary[name] = entry
    return summary


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "malloc": ", ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()),
    }
    if have_accelerate():
        import accelerate

        info["accelerate"] = accelerate.__version__
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every benchmark script shares (driver side and worker side)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--quick", action="store_true", help="a short smoke run (numbers are not meaningful)")
    p.add_argument("--launches", type=int, help="fresh 2-process launches per case")
    p.add_argument("--no-accelerate", action="store_true", help="leave the Accelerate variant out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--config", type=json.loads, help=argparse.SUPPRESS)
    return p


def variants_wanted(args: argparse.Namespace) -> list[str]:
    names = [BASELINE, "distrib"]
    if not args.no_accelerate and have_accelerate():
        names.append("accelerate")
    return names


_OUT: Path | None = None


def emit(result: dict[str, Any]) -> None:
    """Worker side: rank 0 writes its result now (call it inside the scope, before the teardown)."""
    global _OUT
    if _OUT is not None and int(os.environ.get("RANK", "0")) == 0:
        tmp = _OUT.with_suffix(".partial")
        tmp.write_text(json.dumps(result))
        tmp.replace(_OUT)  # whole or absent: a rank that dies later cannot leave half a file
    _OUT = None


def run_worker(args: argparse.Namespace, body: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Worker side: run `body(config)` on every rank; rank 0 writes the result to `--out`.

    The result is written as soon as `body` calls `emit` (or, failing that, when it returns), so a rank
    that aborts while tearing the process group down (a known gloo exit race) does not lose the figures.
    """
    import torch.distributed as dist

    global _OUT
    _OUT = args.out
    result = body(args.config)
    if result is not None:
        emit(result)
    if dist.is_initialized():  # a distrib scope owns the group and closes it; anything else, close here
        dist.barrier()
        dist.destroy_process_group()


def finish(name: str, args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Driver side: stamp the result, print it and write `--json`."""
    result = {"benchmark": name, "quick": bool(args.quick), "machine": machine(), **result}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return result


def run_cases(
    script: Path, args: argparse.Namespace, groups: list[list[dict[str, Any]]], default_launches: int
) -> list[dict[str, Any]]:
    """Launch every group of cases `launches` times (groups alternate between launches); summarise.

    The cases of one group share a launch: the worker gets `{"cases": [...]}` and returns
    `{"times": {case: {variant: [seconds, ...]}}}`.
    """
    launches = args.launches or (1 if args.quick else default_launches)
    raw: dict[str, list[dict[str, dict[str, list[float]]]]] = {c["case"]: [] for g in groups for c in g}
    exits = dict.fromkeys(raw, 0)  # launches that wrote their result, then failed while exiting
    for i in range(launches):
        for group in groups:
            names = ", ".join(c["case"] for c in group)
            print(f"[{script.stem}] launch {i + 1}/{launches}: {names}", file=sys.stderr, flush=True)
            result = launch(script, {"cases": group})
            for case in group:
                raw[case["case"]].append(result["times"][case["case"]])
                exits[case["case"]] += result["exit_code"] != 0
    return [
        {
            "case": c["case"],
            "describe": c.get("describe", ""),
            "variants": summarize([t["wall"] for t in raw[c["case"]]]),
            "cpu": summarize([t["cpu"] for t in raw[c["case"]]]),
            "launches": len(raw[c["case"]]),
            "failed_exits": exits[c["case"]],
        }
        for g in groups
        for c in g
    ]
