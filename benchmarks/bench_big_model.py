"""Big-model loading: distrib's `load_checkpoint_and_dispatch` against plain safetensors and Accelerate.

One sharded safetensors checkpoint of `--size-mb` MB (float32, transformer-like MLP blocks) is written
once. Every measurement runs in a fresh process (so peak RSS is the variant's own), and the variants
alternate: each repetition runs every variant once, in an order that rotates every repetition. Each
process reports

- load: from building the model (on the meta device) to a model ready to run;
- first forward: the first forward pass (safetensors maps files lazily, so the reads happen here);
- second forward: a later pass (for offloaded variants: the cost of streaming weights every time);
- peak RSS: growth of the process's resident-set high-water mark over its state before loading
  (Linux `VmHWM`, reset through `/proc/self/clear_refs`; elsewhere `ru_maxrss`, which includes imports).

Variants, all fp32 on the CPU with the same input, outputs compared for equality:

- `safetensors`: `load_file` per shard into a meta-device model with `load_state_dict(assign=True)`;
- `distrib`: `init_empty_weights` + `load_checkpoint_and_dispatch(device_map={"": "cpu"})`;
- `distrib offload`: the same with `max_memory={"cpu": budget}` and an offload folder (rest on disk);
- `accelerate` and `accelerate offload`: Accelerate's functions with the same arguments, when installed.

The checkpoint files stay in the page cache between runs (nothing drops caches), so the figures compare
CPU and memory work rather than disk speed; offload folders are written fresh for every run.

    python benchmarks/bench_big_model.py --json big_model.json [--size-mb 512] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's distrib, installed or not

DIM = 1024
MB = 10**6


class Block(nn.Module):
    """A transformer-like MLP block: norm, up-projection, GELU, down-projection, residual (~34 MB)."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def num_blocks_for(size_mb: int) -> int:
    per_block = (2 * 4 * DIM * DIM + 4 * DIM + 3 * DIM) * 4
    return max(2, round(size_mb * MB / per_block))


def write_checkpoint(folder: Path, num_blocks: int, shard_mb: int) -> None:
    """Write the model as sharded safetensors plus its index, a few blocks at a time."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    index = 0

    def flush() -> None:
        nonlocal shard, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard = {}

    for number in range(num_blocks):
        block = Block()
        for key, value in block.state_dict().items():
            shard[f"blocks.{number}.{key}"] = value
        if sum(t.numel() * 4 for t in shard.values()) >= shard_mb * MB:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


# -- one measurement, in its own process ----------------------------------------------------------------


def _peak_rss() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _load_plain(checkpoint: Path, num_blocks: int, **_: Any) -> nn.Module:
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = Model(num_blocks)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    for file_name in sorted(set(index["weight_map"].values())):
        model.load_state_dict(load_file(str(checkpoint / file_name)), strict=False, assign=True)
    return model


def _load_distrib(checkpoint: Path, num_blocks: int, budget: int | None, offload: Path) -> nn.Module:
    from distrib import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = Model(num_blocks)
    if budget is None:
        return load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "cpu"})
    return load_checkpoint_and_dispatch(
        model,
        checkpoint,
        max_memory={"cpu": budget},
        no_split_module_classes=["Block"],
        offload_folder=offload,
    )


def _load_accelerate(checkpoint: Path, num_blocks: int, budget: int | None, offload: Path) -> nn.Module:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = Model(num_blocks)
    if budget is None:
        return load_checkpoint_and_dispatch(model, str(checkpoint), device_map={"": "cpu"})
    return load_checkpoint_and_dispatch(
        model,
        str(checkpoint),
        device_map="auto",
        max_memory={"cpu": budget},
        no_split_module_classes=["Block"],
        offload_folder=str(offload),
    )


LOADERS = {
    "safetensors": (_load_plain, False),
    "distrib": (_load_distrib, False),
    "distrib offload": (_load_distrib, True),
    "accelerate": (_load_accelerate, False),
    "accelerate offload": (_load_accelerate, True),
}


def measure(variant: str, checkpoint: Path, num_blocks: int, budget: int, offload: Path) -> dict[str, Any]:
    """Load, run twice, and report times, peak RSS growth and an output checksum."""
    loader, offloads = LOADERS[variant]
    torch.manual_seed(1)
    x = torch.randn(1, 16, DIM)
    if variant.startswith("distrib"):
        import distrib.big_modeling  # noqa: F401  (imports are not part of the load time)
    elif variant.startswith("accelerate"):
        import accelerate  # noqa: F401
    _reset_peak_rss()
    baseline = _peak_rss()
    start = time.perf_counter()
    model = loader(checkpoint, num_blocks, budget=budget if offloads else None, offload=offload)
    loaded = time.perf_counter()
    with torch.no_grad():
        out = model(x)
        first = time.perf_counter()
        model(x)
        second = time.perf_counter()
    return {
        "variant": variant,
        "load_s": loaded - start,
        "first_forward_s": first - loaded,
        "second_forward_s": second - first,
        "peak_rss_mb": (_peak_rss() - baseline) / MB,
        "checksum": float(out.double().sum()),
    }


# -- the driver ------------------------------------------------------------------------------------------


def _run_child(variant: str, checkpoint: Path, num_blocks: int, budget: int, work: Path) -> dict[str, Any]:
    offload = work / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, __file__, "--child", variant, "--checkpoint", str(checkpoint)]
    cmd += ["--blocks", str(num_blocks), "--budget", str(budget), "--offload", str(offload)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _summary(runs: list[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    checksums = {v: {r["checksum"] for r in runs if r["variant"] == v} for v in variants}
    reference = next(iter(checksums["safetensors"]))
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        row: dict[str, Any] = {"variant": variant}
        for key, label in (("load_s", "load s"), ("first_forward_s", "first forward s"),
                           ("second_forward_s", "second forward s"), ("peak_rss_mb", "peak RSS MB")):  # fmt: skip
            values = [r[key] for r in mine]
            row[label] = f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"
        row["same output"] = "yes" if checksums[variant] == {reference} else "NO"
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if importlib.util.find_spec("accelerate") is not None:
        import accelerate

        info["accelerate"] = accelerate.__version__
    return info


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--size-mb", type=int, default=512, help="model size in MB (float32)")
    p.add_argument("--shard-mb", type=int, default=128, help="approximate shard size in MB")
    p.add_argument("--budget-fraction", type=float, default=0.25, help="RAM budget of the offload variants")
    p.add_argument("--repeats", type=int, default=5, help="processes per variant (alternating)")
    p.add_argument("--quick", action="store_true", help="a small smoke run (figures not meaningful)")
    p.add_argument("--no-accelerate", action="store_true", help="leave the Accelerate variants out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    p.add_argument("--offload", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _measure_all(
    variants: list[str], num_blocks: int, shard_mb: int, fraction: float, repeats: int
) -> dict[str, Any]:
    """Write the checkpoint, then run every variant `repeats` times, alternating, each in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "checkpoint"
        checkpoint.mkdir()
        write_checkpoint(checkpoint, num_blocks, shard_mb)
        model_mb = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / MB
        budget = int(model_mb * MB * fraction)
        runs = []
        for repeat in range(repeats):
            shift = repeat % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                print(f"[big_model] repeat {repeat + 1}/{repeats}: {variant}", file=sys.stderr, flush=True)
                runs.append({"repeat": repeat, **_run_child(variant, checkpoint, num_blocks, budget, work)})
    config = {"model_mb": round(model_mb), "blocks": num_blocks, "shard_mb": shard_mb}
    return {"config": {**config, "offload_budget_mb": round(budget / MB), "repeats": repeats}, "runs": runs}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.child:
        result = measure(args.child, args.checkpoint, args.blocks, args.budget, args.offload)
        print(json.dumps(result))
        return result
    # quick: a 4-block model whose offload budget still keeps one block in RAM (Accelerate cannot load
    # a checkpoint whose map sends everything to disk: it passes "disk" to safetensors as a device)
    size_mb, repeats = (136, 1) if args.quick else (args.size_mb, args.repeats)
    fraction = 0.6 if args.quick else args.budget_fraction
    variants = ["safetensors", "distrib", "distrib offload"]
    if not args.no_accelerate and importlib.util.find_spec("accelerate") is not None:
        variants += ["accelerate", "accelerate offload"]
    measured = _measure_all(variants, num_blocks_for(size_mb), args.shard_mb, fraction, repeats)
    rows = _summary(measured["runs"], variants)
    print(_markdown(rows))
    config = measured["config"]
    result = {
        "benchmark": "big_model",
        "title": "Big-model loading: load, first forward, peak RSS",
        "quick": bool(args.quick),
        "machine": _machine(),
        "config": config,
        "rows": rows,
        "notes": [
            f"{config['model_mb']} MB fp32 model in {config['shard_mb']} MB shards; offload variants get "
            f"max_memory cpu = {config['offload_budget_mb']} MB and put the rest on disk.",
            "Cells: median (min-max) over fresh processes; variants alternate, the order rotating each repeat.",
            "Peak RSS: growth of the process's high-water mark over its state just before loading.",
            "Checkpoint files are in the page cache; offload folders are written anew by every run.",
        ],
        "runs": measured["runs"],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
