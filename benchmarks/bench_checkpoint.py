"""Checkpoint speed: `save_state` / `load_state` against raw safetensors and `torch.save` in the same run.

One process, one model of `--size-mb` MB of float32 parameters trained one AdamW step (the optimizer holds
two more tensors per parameter, so the checkpoint is about 3x `--size-mb`; the default makes it > 1 GB).
Every round runs each variant once, in an order that rotates every round; tables report the median (and
min-max) over rounds, MB/s over the bytes of all model and optimizer tensors, and the ratio of distrib's
throughput to its baseline (1.0 = as fast).

Save (every variant ends with its files fsynced):
- `save_state`: distrib's atomic save (CRC-32C computed while writing, manifest, rename, fsyncs);
- raw: `safetensors.save_file` of the model + `torch.save` of the optimizer state, each fsynced (the
  baseline), and `safetensors.save_file` of every tensor in one file + fsync.

Load (each load's files evicted from the page cache first with `posix_fadvise(DONTNEED)`, so both read
from the disk; `--warm` keeps them cached):
- `load_state` (full CRC-32C verification, straight into the prepared parameters) and with
  `verify="size"`;
- raw: `safetensors.load_file` of every tensor plus first use (each tensor summed once: safetensors maps
  the file lazily, so the read happens at first use) (the baseline).

Background: the time `save_state(background=True)` blocks (vs a synchronous save of the same state), and
the throughput of a training loop (a separate MLP) while a background save is written, vs without one.

    python benchmarks/bench_checkpoint.py --json checkpoint.json [--size-mb 350] [--rounds 3] [--quick]
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

SAVE_BASELINE = "raw: save_file(model) + torch.save(optimizer) + fsync"
LOAD_BASELINE = "raw: safetensors load_file + first use"
BASELINES = {
    "save_state": SAVE_BASELINE,
    "raw: safetensors save_file(all) + fsync": SAVE_BASELINE,
    "load_state": LOAD_BASELINE,
    "load_state (verify=size)": LOAD_BASELINE,
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _evict(path: Path) -> None:
    """Drop a file's (or a directory's files') clean pages from the page cache (Linux)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_save(model: Any, optimizer: Any, directory: Path) -> None:
    directory.mkdir()
    save_file({k: v.detach() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    _fsync(directory / "model.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    _fsync(directory / "optimizer.pt")


def _load_and_touch(path: Path) -> float:
    return float(sum(t.sum() for t in load_file(str(path)).values()))


class Variants:
    """The timed operations of one round, on fixed inputs written once."""

    def __init__(self, model: Any, optimizer: Any, work: Path, warm: bool) -> None:
        self.model, self.optimizer, self.work, self.warm = model, optimizer, work, warm
        self.tensors = flat_tensors(model, optimizer)
        self.fixed_ckpt, self.fixed_file = work / "fixed_ckpt", work / "fixed.safetensors"
        save_state(self.fixed_ckpt)
        save_file(self.tensors, str(self.fixed_file))

    def fresh(self, name: str) -> Path:
        path = self.work / name
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
        return path

    def cold(self, path: Path) -> Path:
        if not self.warm:
            _evict(path)
        return path

    def table(self) -> dict[str, Callable[[], float]]:
        def flat_save() -> None:
            path = self.fresh("file.safetensors")
            save_file(self.tensors, str(path))
            _fsync(path)

        def load(verify: str) -> Callable[[], float]:
            return lambda: _timed(lambda: load_state(self.cold(self.fixed_ckpt), verify=verify))  # type: ignore[arg-type]

        return {
            "save_state": lambda: _timed(lambda: save_state(self.fresh("ckpt"))),
            SAVE_BASELINE: lambda: _timed(lambda: _raw_save(self.model, self.optimizer, self.fresh("raw"))),
            "raw: safetensors save_file(all) + fsync": lambda: _timed(flat_save),
            "load_state": load("checksum"),
            "load_state (verify=size)": load("size"),
            LOAD_BASELINE: lambda: _timed(lambda: _load_and_touch(self.cold(self.fixed_file))),
        }


def _train_steps(net: torch.nn.Module, opt: torch.optim.Optimizer, seconds: float) -> float:
    """Training steps per second of a small MLP over `seconds`."""
    x = torch.randn(256, 1024)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loss = net(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    return steps / (time.perf_counter() - start)


def background(variants: Variants, rounds: int) -> dict[str, list[float]]:
    """Blocking time of background saves vs synchronous saves, and training throughput during a save."""
    net = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    out: dict[str, list[float]] = {
        "sync": [],
        "blocking": [],
        "total": [],
        "idle_steps": [],
        "busy_steps": [],
    }
    for r in range(rounds + 1):  # round 0 warms up the snapshot buffers
        sync = _timed(lambda: save_state(variants.fresh("bg_sync")))
        start = time.perf_counter()
        handle = save_state(variants.fresh("bg"), background=True)
        blocking = time.perf_counter() - start
        busy = _train_steps(net, opt, 0.5)  # while the files are written
        handle.wait()
        total = time.perf_counter() - start
        idle = _train_steps(net, opt, 0.5)
        if r:
            for key, value in zip(out, (sync, blocking, total, idle, busy)):
                out[key].append(value)
    return out


def measure(size_mb: int, rounds: int, work: Path, warm: bool) -> dict[str, Any]:
    with distributed(cpu=True):
        model, optimizer = build(size_mb)
        variants = Variants(model, optimizer, work, warm)
        nbytes = sum(t.numel() * t.element_size() for t in variants.tensors.values())
        table = variants.table()
        names = list(table)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = table[name]()
                if r:
                    times[name].append(seconds)
        bg = background(variants, rounds)
    return {"bytes": nbytes, "times": times, "background": bg}


def summarize(measured: dict[str, Any]) -> dict[str, dict[str, float]]:
    mb = measured["bytes"] / 1e6
    out: dict[str, dict[str, float]] = {}
    for name, values in measured["times"].items():
        median = statistics.median(values)
        out[name] = {"median_s": median, "min_s": min(values), "max_s": max(values), "mb_per_s": mb / median}
    for name, baseline in BASELINES.items():
        out[name]["ratio"] = out[name]["mb_per_s"] / out[baseline]["mb_per_s"]
    return out


def summarize_background(bg: dict[str, list[float]]) -> dict[str, float]:
    blocking = [b / s for b, s in zip(bg["blocking"], bg["sync"])]
    throughput = [busy / idle for busy, idle in zip(bg["busy_steps"], bg["idle_steps"])]
    return {
        "sync_s": statistics.median(bg["sync"]),
        "blocking_s": statistics.median(bg["blocking"]),
        "total_s": statistics.median(bg["total"]),
        "blocking_ratio": statistics.median(blocking),
        "blocking_ratio_min": min(blocking),
        "blocking_ratio_max": max(blocking),
        "throughput_ratio": statistics.median(throughput),
        "throughput_ratio_min": min(throughput),
        "throughput_ratio_max": max(throughput),
    }


def markdown(summary: dict[str, dict[str, float]], bg: dict[str, float], nbytes: int, warm: bool) -> str:
    cache = "page cache kept" if warm else "files evicted from the page cache before each load"
    lines = [
        f"Checkpoint of {nbytes / 1e6:.0f} MB (model + AdamW state), medians over rounds ({cache})",
        "",
        "| variant | median s (min-max) | MB/s | throughput vs raw |",
        "|---|---|---|---|",
    ]
    for name, row in summary.items():
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "baseline" if name in BASELINES.values() else ""
        spread = f"{row['median_s']:.3f} ({row['min_s']:.3f}-{row['max_s']:.3f})"
        lines.append(f"| {name} | {spread} | {row['mb_per_s']:.0f} | {ratio} |")
    lines += [
        "",
        "| background save | median | min-max |",
        "|---|---|---|",
        f"| blocking time / synchronous save | {bg['blocking_ratio']:.3f} | "
        f"{bg['blocking_ratio_min']:.3f}-{bg['blocking_ratio_max']:.3f} |",
        f"| training throughput while saving / without | {bg['throughput_ratio']:.2f} | "
        f"{bg['throughput_ratio_min']:.2f}-{bg['throughput_ratio_max']:.2f} |",
        f"| seconds: synchronous save, blocking, until complete | {bg['sync_s']:.3f}, {bg['blocking_s']:.3f}, "
        f"{bg['total_s']:.3f} | |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=350, help="model parameters in MB (float32)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary directory)")
    parser.add_argument("--warm", action="store_true", help="keep files in the page cache for loads")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (numbers not meaningful)")
    args = parser.parse_args(argv)
    size_mb, rounds = (8, 1) if args.quick else (args.size_mb, args.rounds)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        measured = measure(size_mb, rounds, Path(tmp), args.warm)
    summary = summarize(measured)
    bg = summarize_background(measured["background"])
    print(markdown(summary, bg, measured["bytes"], args.warm))
    result = {
        "benchmark": "checkpoint",
        "quick": args.quick,
        "size_mb": size_mb,
        "rounds": rounds,
        "bytes": measured["bytes"],
        "warm": args.warm,
        "variants": summary,
        "background": bg,
        "raw_seconds": measured["times"],
        "raw_background": measured["background"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
