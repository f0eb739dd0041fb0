"""Checkpoint throughput: `save_state` / `load_state` against safetensors writing the same tensors.

One process, one model of `--size-mb` MB of float32 parameters trained one AdamW step (so the optimizer
holds two more tensors per parameter). Every round runs each variant once, in an order that rotates every
round; the table reports the median over rounds, MB/s over the bytes of all model and optimizer tensors,
and the ratio of distrib's throughput to the matching safetensors baseline (1.0 = as fast).

- save: `save_state(dir)` (writes, fsyncs every file, sha256 of every file, manifest, atomic rename)
  vs `safetensors.torch.save_file` of the same tensors in one file (no fsync), and the same plus fsync;
- load: `load_state(dir)` (verifies sizes and sha256, reads, copies into the model and optimizer), also
  with `verify="size"`, vs `safetensors.torch.load_file` plus first use (every tensor summed once:
  safetensors maps the file lazily, so the read happens at first use).

Files are read back from the page cache in both cases (the benchmark does not drop caches).

    python benchmarks/bench_checkpoint.py --json checkpoint.json [--size-mb 128] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's distrib, installed or not

from distrib import distributed, prepare  # noqa: E402
from distrib.checkpointing import load_state, save_state  # noqa: E402

BASELINES = {
    "save_state": "safetensors save_file",
    "load_state": "safetensors load_file + first use",
    "load_state (verify=size)": "safetensors load_file + first use",
}


def build(size_mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 1024
    layers = max(1, size_mb * 2**20 // (4 * width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = prepare(model, optimizer)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def flat_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, flattened into one safetensors-ready dict."""
    tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    for pid, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{pid}.{name}"] = value.reshape(-1) if value.dim() == 0 else value
    return tensors


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _save_file_fsync(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _load_and_touch(path: Path) -> float:
    return float(sum(t.sum() for t in load_file(str(path)).values()))


def variants(model: Any, optimizer: Any, work: Path) -> dict[str, Callable[[int], float]]:
    tensors = flat_tensors(model, optimizer)
    fixed_ckpt, fixed_file = work / "fixed_ckpt", work / "fixed.safetensors"
    save_state(fixed_ckpt)
    save_file(tensors, str(fixed_file))

    def fresh(name: str) -> Path:
        path = work / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return path

    return {
        "save_state": lambda r: _timed(lambda: save_state(fresh("ckpt"))),
        "safetensors save_file": lambda r: _timed(lambda: save_file(tensors, str(fresh("file.safetensors")))),
        "safetensors save_file + fsync": lambda r: _timed(
            lambda: _save_file_fsync(tensors, fresh("file.safetensors"))
        ),
        "load_state": lambda r: _timed(lambda: load_state(fixed_ckpt)),
        "load_state (verify=size)": lambda r: _timed(lambda: load_state(fixed_ckpt, verify="size")),
        "safetensors load_file + first use": lambda r: _timed(lambda: _load_and_touch(fixed_file)),
    }


def measure(size_mb: int, rounds: int, work: Path) -> dict[str, Any]:
    with distributed(cpu=True):
        model, optimizer = build(size_mb)
        nbytes = sum(t.numel() * t.element_size() for t in flat_tensors(model, optimizer).values())
        table = variants(model, optimizer, work)
        names = list(table)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = table[name](r)
                if r:
                    times[name].append(seconds)
    return {"bytes": nbytes, "times": times}


def summarize(measured: dict[str, Any]) -> dict[str, dict[str, float]]:
    mb = measured["bytes"] / 1e6
    out: dict[str, dict[str, float]] = {}
    for name, values in measured["times"].items():
        median = statistics.median(values)
        out[name] = {"median_s": median, "min_s": min(values), "max_s": max(values), "mb_per_s": mb / median}
    for name, baseline in BASELINES.items():
        out[name]["ratio"] = out[name]["mb_per_s"] / out[baseline]["mb_per_s"]
    return out


def markdown(summary: dict[str, dict[str, float]], nbytes: int) -> str:
    lines = [
        f"Checkpoint of {nbytes / 1e6:.0f} MB (model + AdamW state), medians over rounds",
        "",
        "| variant | median s (min-max) | MB/s | throughput vs safetensors |",
        "|---|---|---|---|",
    ]
    for name, row in summary.items():
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
        spread = f"{row['median_s']:.3f} ({row['min_s']:.3f}-{row['max_s']:.3f})"
        lines.append(f"| {name} | {spread} | {row['mb_per_s']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=128, help="model parameters in MB (float32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (numbers not meaningful)")
    args = parser.parse_args(argv)
    size_mb, rounds = (8, 1) if args.quick else (args.size_mb, args.rounds)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        measured = measure(size_mb, rounds, Path(tmp))
    summary = summarize(measured)
    print(markdown(summary, measured["bytes"]))
    result = {
        "benchmark": "checkpoint",
        "quick": args.quick,
        "size_mb": size_mb,
        "rounds": rounds,
        "bytes": measured["bytes"],
        "variants": summary,
        "raw_seconds": measured["times"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
