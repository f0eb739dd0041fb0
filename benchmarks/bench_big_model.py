"""Big-model inference: load time, generate time per token and peak RSS, against the plain model.

A GPT-2 built from a config (GPT-2 small's widths, `--layers` blocks: 384 MB in fp32 with 8) is saved once
with `save_pretrained(max_shard_size=...)` as sharded safetensors. Every measurement runs in a fresh
process (so peak RSS is the variant's own) and the variants alternate: each repetition runs every variant
once, in an order that rotates every repetition. Each process reports

- load: from building the model (on the meta device) to a model ready to run;
- first token: time to the first token of the first `generate()` after loading (prefill, and the page
  faults of first use);
- per token: median time between consecutive tokens of a `generate()` (steady decoding), measured for
  all variants in one process in interleaved rounds (paired ratios: neighbours in time share the load);
- peak RSS: growth of the process's resident-set high-water mark over its state before loading (Linux
  `VmHWM`, reset through `/proc/self/clear_refs`; file pages mapped in count, as they do for the kernel).

Variants, all fp32 on the CPU, greedy decoding from the same prompt, tokens compared for equality:

- `plain`: `load_file` per shard into a meta-device model with `load_state_dict(assign=True)`;
- `distrib`: `init_empty_weights` + `load_checkpoint_and_dispatch(device_map={"": "cpu"})`;
- `distrib offload`: the same with `max_memory={"cpu": budget}` and an offload folder (the planner keeps
  the embedding and as many blocks as fit in RAM; the other blocks are read from the checkpoint's own
  files, memory-mapped, with the next one prefetched);
- `distrib disk`: `device_map={"": "disk"}`: every layer streamed from the files, the worst case;
- `accelerate` and `accelerate offload`: Accelerate's functions with the same arguments, when installed.

The checkpoint files stay in the page cache between runs (nothing drops caches), so the figures compare
CPU and memory work rather than disk speed.

    python benchmarks/bench_big_model.py --json big_model.json [--layers 8] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's distrib, installed or not

MB = 10**6
PROMPT_LENGTH = 16


def config(layers: int, quick: bool) -> Any:
    import transformers

    if quick:
        return transformers.GPT2Config(n_layer=layers, n_embd=128, n_head=4, vocab_size=4096, n_positions=256)
    return transformers.GPT2Config(n_layer=layers)


def write_checkpoint(folder: Path, layers: int, quick: bool) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(layers, quick))
    model.save_pretrained(folder, max_shard_size="2MB" if quick else "50MB")


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


def _empty_model(layers: int, quick: bool) -> nn.Module:
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config(layers, quick))
    return model.eval()


def _load_plain(checkpoint: Path, layers: int, quick: bool, **_: Any) -> nn.Module:
    from safetensors.torch import load_file

    model = _empty_model(layers, quick)
    for file in sorted(checkpoint.glob("*.safetensors")):
        model.load_state_dict(load_file(str(file)), strict=False, assign=True)
    model.tie_weights()
    return model


def _load_distrib(
    checkpoint: Path, layers: int, quick: bool, budget: int | None, offload: Path, disk: bool = False
) -> nn.Module:
    import transformers

    from distrib import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config(layers, quick)).eval()
    if disk:
        return load_checkpoint_and_dispatch(
            model, checkpoint, device_map={"": "disk"}, offload_folder=offload
        )
    if budget is None:
        return load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "cpu"})
    return load_checkpoint_and_dispatch(model, checkpoint, max_memory={"cpu": budget}, offload_folder=offload)


def _load_accelerate(
    checkpoint: Path, layers: int, quick: bool, budget: int | None, offload: Path
) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config(layers, quick)).eval()
    model.tie_weights()  # Accelerate's loaders expect the ties in place (lm_head is not in the checkpoint)
    if budget is None:
        return load_checkpoint_and_dispatch(model, str(checkpoint), device_map={"": "cpu"})
    return load_checkpoint_and_dispatch(
        model,
        str(checkpoint),
        device_map="auto",
        max_memory={"cpu": budget},
        no_split_module_classes=["GPT2Block"],
        offload_folder=str(offload),
    )


def _load(variant: str, checkpoint: Path, layers: int, quick: bool, budget: int, offload: Path) -> nn.Module:
    if variant == "plain":
        return _load_plain(checkpoint, layers, quick)
    if variant.startswith("accelerate"):
        return _load_accelerate(checkpoint, layers, quick, budget if "offload" in variant else None, offload)
    disk = variant == "distrib disk"
    return _load_distrib(checkpoint, layers, quick, budget if "offload" in variant else None, offload, disk)


def _generate(model: nn.Module, ids: torch.Tensor, tokens: int) -> tuple[float, list[float], list[int]]:
    """Greedy generate; returns the time to the first token, the time of each later token, the tokens."""
    import transformers

    times: list[float] = []

    class Clock(transformers.StoppingCriteria):  # called once per generated token
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            stopping_criteria=transformers.StoppingCriteriaList([Clock()]),
        )
    steps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return times[0] - start, steps, out[0].tolist()


def measure(
    variant: str, checkpoint: Path, layers: int, quick: bool, budget: int, offload: Path, tokens: int
) -> dict[str, Any]:
    """Load, generate twice, and report times, peak RSS growth and the generated tokens."""
    import transformers

    if variant.startswith("distrib"):
        import distrib.big_modeling  # noqa: F401
    elif variant.startswith("accelerate"):
        import accelerate  # noqa: F401
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    _empty_model(layers, quick)  # transformers imports the model's module on first use: not load time
    torch.manual_seed(1)
    ids = torch.randint(0, config(layers, quick).vocab_size, (1, PROMPT_LENGTH))
    _reset_peak_rss()
    baseline = _peak_rss()
    start = time.perf_counter()
    model = _load(variant, checkpoint, layers, quick, budget, offload)
    loaded = time.perf_counter() - start
    first, _, _ = _generate(model, ids, 1 + tokens)  # first use: the pages are read and mapped here
    _, steps, out = _generate(model, ids, 1 + tokens)
    device_map = getattr(model, "hf_device_map", {"": "cpu"})
    return {
        "variant": variant,
        "load_s": loaded,
        "first_token_s": first,
        "per_token_s": statistics.median(steps),
        "peak_rss_mb": (_peak_rss() - baseline) / MB,
        "tokens": out,
        "on_disk": sorted(name for name, device in device_map.items() if device == "disk"),
    }


def measure_rounds(
    variants: list[str], checkpoint: Path, layers: int, quick: bool, budget: int, offload: Path, args: Any
) -> dict[str, Any]:
    """All variants in one process, timed in interleaved rounds: per-token times paired round by round."""
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # the machine is shared: one compute thread per variant, same for all
    torch.manual_seed(1)
    ids = torch.randint(0, config(layers, quick).vocab_size, (1, PROMPT_LENGTH))
    models = {v: _load(v, checkpoint, layers, quick, budget, offload / v.replace(" ", "_")) for v in variants}
    for model in models.values():
        _generate(model, ids, 3)  # warm-up
    rounds: list[dict[str, float]] = []
    for index in range(args.rounds):
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        rounds.append({v: statistics.median(_generate(models[v], ids, 1 + args.tokens)[1]) for v in order})
    return {"rounds": rounds}


# -- the driver ------------------------------------------------------------------------------------------


def _run_child(
    variant: str, checkpoint: Path, args: argparse.Namespace, budget: int, work: Path
) -> dict[str, Any]:
    offload = work / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    offload.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "ACCELERATE_USE_CPU": "true",
    }
    cmd = [sys.executable, __file__, "--child", variant, "--checkpoint", str(checkpoint)]
    cmd += ["--layers", str(args.layers), "--budget", str(budget), "--offload", str(offload)]
    cmd += ["--tokens", str(args.tokens), "--rounds", str(args.rounds)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _cell(values: list[float], digits: str = ".3g") -> str:
    return f"{statistics.median(values):{digits}} ({min(values):{digits}}-{max(values):{digits}})"


def _ratio(rounds: list[dict[str, float]], variant: str) -> str:
    ratios = sorted(r[variant] / r["plain"] for r in rounds)
    low, high = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    return f"{statistics.median(ratios):.2f}x ({low:.2f}-{high:.2f})"


def _blocks_on_disk(on_disk: list[str], layers: int) -> str:
    """How many GPT-2 blocks a flat map puts on disk (an entry may be a block or any module holding it)."""
    blocks = [f"transformer.h.{i}" for i in range(layers)]
    count = sum(
        any(entry == "" or block == entry or block.startswith(entry + ".") for entry in on_disk)
        for block in blocks
    )
    return f"{count} of {layers}"


def _summary(
    runs: list[dict[str, Any]], rounds: list[dict[str, float]], variants: Sequence[str], layers: int
) -> list[dict[str, Any]]:
    rows = []
    reference = next(r["tokens"] for r in runs if r["variant"] == "plain")
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        rows.append(
            {
                "variant": variant,
                "load s": _cell([r["load_s"] for r in mine]),
                "first token s": _cell([r["first_token_s"] for r in mine]),
                "per token ms": _cell([1000 * r[variant] for r in rounds]),
                "per token vs plain": _ratio(rounds, variant),
                "peak RSS MB": _cell([r["peak_rss_mb"] for r in mine], ".0f"),
                "same tokens": "yes" if all(r["tokens"] == reference for r in mine) else "NO",
                "blocks on disk": _blocks_on_disk(mine[0]["on_disk"], layers),
            }
        )
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    for package in ("transformers", "accelerate"):
        if importlib.util.find_spec(package) is not None:
            info[package] = __import__(package).__version__
    info["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return info


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--layers", type=int, default=8, help="GPT-2 blocks (8: 384 MB in fp32)")
    p.add_argument("--budget-mb", type=int, default=300, help="RAM budget of the offload variant, MB")
    p.add_argument("--tokens", type=int, default=20, help="tokens generated for the steady per-token time")
    p.add_argument(
        "--repeats", type=int, default=3, help="processes per variant for load and RSS (alternating)"
    )
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds in one process")
    p.add_argument("--quick", action="store_true", help="a small smoke run (figures not meaningful)")
    p.add_argument("--no-accelerate", action="store_true", help="leave the Accelerate variants out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    p.add_argument("--offload", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _measure_all(args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    """Write the checkpoint, then run every variant `repeats` times, alternating, each in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "checkpoint"
        write_checkpoint(checkpoint, args.layers, args.quick)
        model_mb = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / MB
        budget = int(model_mb * MB * 0.6) if args.quick else args.budget_mb * MB
        runs = []
        for repeat in range(args.repeats):
            shift = repeat % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                print(
                    f"[big_model] repeat {repeat + 1}/{args.repeats}: {variant}", file=sys.stderr, flush=True
                )
                runs.append({"repeat": repeat, **_run_child(variant, checkpoint, args, budget, work)})
        print(f"[big_model] {args.rounds} interleaved timing rounds", file=sys.stderr, flush=True)
        rounds = _run_child("rounds:" + ",".join(variants), checkpoint, args, budget, work)["rounds"]
    empty = _empty_model(args.layers, args.quick)
    layer_mb = sum(p.numel() * 4 for p in empty.transformer.h[0].parameters()) / MB
    config_ = {"model_mb": round(model_mb), "layers": args.layers, "block_mb": round(layer_mb, 1)}
    config_ = {
        **config_,
        "offload_budget_mb": round(budget / MB),
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    return {"config": config_, "runs": runs, "rounds": rounds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.child and args.child.startswith("rounds:"):
        variants = args.child.removeprefix("rounds:").split(",")
        result = measure_rounds(
            variants, args.checkpoint, args.layers, args.quick, args.budget, args.offload, args
        )
        print(json.dumps(result))
        return result
    if args.child:
        result = measure(
            args.child, args.checkpoint, args.layers, args.quick, args.budget, args.offload, args.tokens
        )
        print(json.dumps(result))
        return result
    if args.quick:
        args.layers, args.repeats, args.tokens, args.rounds = 4, 1, 8, 3
    variants = ["plain", "distrib", "distrib offload", "distrib disk"]
    if not args.no_accelerate and importlib.util.find_spec("accelerate") is not None:
        variants += ["accelerate", "accelerate offload"]
    measured = _measure_all(args, variants)
    rows = _summary(measured["runs"], measured["rounds"], variants, args.layers)
    print(_markdown(rows))
    config_ = measured["config"]
    result = {
        "benchmark": "big_model",
        "title": "Big-model inference: load, generate per token, peak RSS (GPT-2 on the CPU)",
        "quick": bool(args.quick),
        "machine": _machine(),
        "config": config_,
        "rows": rows,
        "notes": [
            f"GPT-2 with {config_['layers']} blocks, {config_['model_mb']} MB fp32 in 50 MB safetensors shards; "
            f"a block is {config_['block_mb']} MB; the offload variants get max_memory cpu = "
            f"{config_['offload_budget_mb']} MB.",
            f"Greedy generate from a {PROMPT_LENGTH}-token prompt. Load, first token, peak RSS: median (min-max) "
            f"over {args.repeats} fresh processes per variant, variants alternating.",
            f"Per token: median time between tokens of one generate() of {args.tokens} tokens, in "
            f"{args.rounds} interleaved rounds in one process (one compute thread); vs plain: median (25th-75th "
            "percentile) of the ratio to the plain model in the same round.",
            "Peak RSS: growth of the process's high-water mark over its state just before loading.",
            "Checkpoint files are in the page cache; the machine is shared with other work (load average in machine).",
        ],
        "runs": measured["runs"],
        "rounds": measured["rounds"],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
