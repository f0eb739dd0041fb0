"""What distrib's silent-failure checks cost, next to the training step they guard (2 processes, gloo).

Measured in one run of the bench_step models (a tiny MLP, where per-step overhead shows most, and a small
transformer):

* the preemption agreement (an all-reduce started at one optimizer-step boundary and read at the next):
  rounds of the training loop with it and without it, interleaved, as a ratio of the step time;
* the replica divergence check: the time of one check (digests of every replicated tensor, one
  all-gather), and that time spread over the default interval (`check_replicas_every=1000` steps) as a
  share of the step time.

The collective ledger is measured by `bench_gather` and bench_step's `logging` case; the first-step checks
run once per run.

    python benchmarks/bench_guards.py --json guards.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _worker(model_kind: str, samples: int, batch: int, rounds: int) -> dict[str, Any]:
    import _common
    import bench_step
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from distrib import _replicas, backward, distributed, prepare

    torch.set_num_threads(1)
    with distributed(cpu=True) as ctx:
        model, data = bench_step.build(model_kind, samples * ctx.world_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer, loader = prepare(model, optimizer, DataLoader(data, batch_size=batch, shuffle=True))
        preemption = ctx.state.extensions["preemption"]

        def loop() -> int:
            n = 0
            for x, y in loader:
                backward(F.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
                n += 1
            return n

        def without_agreement() -> int:
            ctx.state.extensions.pop("preemption")  # the loader reads it when an iteration starts
            try:
                return loop()
            finally:
                ctx.state.extensions["preemption"] = preemption

        times = _common.interleave(
            {"with": loop, "without": without_agreement}, rounds, warmup=1, barrier=dist.barrier
        )
        checks = []
        for _ in range(5 if rounds < 5 else 20):
            dist.barrier()
            start = time.perf_counter()
            _replicas.check(ctx, 1)
            checks.append(time.perf_counter() - start)
        return {"wall": times["wall"], "check": checks}


def _ratio(result: dict[str, Any]) -> tuple[float, float, float]:
    pairs = [a / b for a, b in zip(result["wall"]["with"], result["wall"]["without"])]
    q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    return statistics.median(pairs), q[0], q[2]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from distrib.testing import run_ranks

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = {"mlp": (64 * 32, 32), "transformer": (16 * 16, 16)}
    rounds = 2 if args.quick else 15
    rows, cases = [], []
    for kind, (samples, batch) in sizes.items():
        result = run_ranks(
            _worker, 2, kind, samples // (4 if args.quick else 1), batch, rounds, timeout=1800
        )[0]
        ratio, p25, p75 = _ratio(result)
        step = statistics.median(result["wall"]["without"])
        check = statistics.median(result["check"])
        share = check / 1000 / step
        cases.append({"case": kind, "agreement_ratio": [ratio, p25, p75], "step_us": step * 1e6,
                      "check_us": check * 1e6, "check_share_at_1000": share})  # fmt: skip
        rows.append(
            f"| {kind} | {step * 1e6:.0f} | {ratio:.3f} ({p25:.3f}-{p75:.3f}) | {check * 1e3:.2f} ms | "
            f"{share * 100:.4f}% |"
        )
    table = "\n".join(
        [
            "Step time, the preemption agreement's ratio (with / without, paired rounds, median and p25-p75), "
            "and one replica check spread over the default 1000 steps",
            "",
            "| model | step (µs) | step with / without the preemption agreement | one replica check | "
            "replica check per step at check_replicas_every=1000 |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    output = {"benchmark": "guards", "title": "Cost of the checks", "quick": args.quick, "cases": cases,
              "markdown_tables": [table]}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(output, indent=2) + "\n")
    return output


if __name__ == "__main__":
    main()
