"""Launch overhead: `distrib launch` vs `torchrun`, and `import distrib` vs `import torch`.

For each launcher, the time from starting the command to the first line printed by the user's script
(the script prints before importing anything), and to the command's exit, with 2 processes on this
machine. Launchers are run alternately, several times each; the table shows medians, the spread (min-max)
and the ratio distrib / torchrun. Import times are measured inside fresh interpreters.

    python benchmarks/bench_launch.py --repeats 5 --json launch.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = 'import os\nprint("FIRST", os.environ.get("RANK"), flush=True)\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_commands(script: str, nproc: int) -> dict[str, list[str]]:
    return {
        "distrib launch": [
            sys.executable,
            "-m",
            "distrib",
            "launch",
            "--quiet",
            "--num-processes",
            str(nproc),
            "--cpu",
            script,
        ],
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(_free_port()),
            script,
        ],
    }


def time_launch(command: list[str], cwd: str, env: dict[str, str], timeout: float = 120) -> dict[str, float]:
    """Seconds to the first line of the user's script and to the command's exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    first = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("FIRST") and first is None:
            first = time.perf_counter() - start
    code = proc.wait(timeout=timeout)
    total = time.perf_counter() - start
    if code != 0 or first is None:
        raise RuntimeError(f"{command} failed with exit code {code}")
    return {"first_line_s": first, "exit_s": total}


def time_import(statement: str) -> float:
    """Seconds an import statement takes in a fresh interpreter."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return float(out.stdout.strip())


def time_command(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, timeout=60)
    return time.perf_counter() - start


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(repeats: int, nproc: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTRIB_", "OMP_NUM_THREADS"))}
    with tempfile.TemporaryDirectory() as tmp:
        env["DISTRIB_CONFIG_DIR"] = tmp  # no user config file
        Path(tmp, "first_line.py").write_text(SCRIPT)
        launches: dict[str, list[dict[str, float]]] = {"distrib launch": [], "torchrun": []}
        for i in range(repeats):  # alternate (A B, then B A), so drifting load and order hit both alike
            commands = list(launch_commands("first_line.py", nproc).items())
            for name, command in commands if i % 2 == 0 else commands[::-1]:
                launches[name].append(time_launch(command, tmp, env))
    imports: dict[str, list[float]] = {
        "import distrib": [],
        "from distrib import distributed": [],
        "import torch": [],
    }
    cli: dict[str, list[float]] = {"distrib --help": [], "python -c pass": []}
    for _ in range(repeats):
        for statement in imports:
            imports[statement].append(time_import(statement))
        cli["distrib --help"].append(time_command([sys.executable, "-m", "distrib", "--help"]))
        cli["python -c pass"].append(time_command([sys.executable, "-c", "pass"]))
    return {
        "repeats": repeats,
        "processes": nproc,
        "launch": {
            name: {key: _summary([r[key] for r in runs]) for key in ("first_line_s", "exit_s")}
            for name, runs in launches.items()
        },
        "import": {name: _summary(v) for name, v in imports.items()},
        "cli": {name: _summary(v) for name, v in cli.items()},
    }


def _cell(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def table(results: dict[str, Any]) -> str:
    launch = results["launch"]
    lines = [
        f"Launch with {results['processes']} processes, {results['repeats']} alternating runs each; "
        "median (min-max) in seconds.",
        "",
        "| measurement | distrib | torch | ratio distrib / torch |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("first_line_s", "command -> first line of the script"),
        ("exit_s", "command -> exit"),
    ):
        d, t = launch["distrib launch"][key], launch["torchrun"][key]
        lines.append(
            f"| {label} (distrib launch vs torchrun) | {_cell(d)} | {_cell(t)} | "
            f"{d['median'] / t['median']:.2f} |"
        )
    t = results["import"]["import torch"]
    for statement in ("import distrib", "from distrib import distributed"):
        d = results["import"][statement]
        lines.append(
            f"| `{statement}` vs `import torch` | {_cell(d)} | {_cell(t)} | {d['median'] / t['median']:.2f} |"
        )
    h, p = results["cli"]["distrib --help"], results["cli"]["python -c pass"]
    lines.append(
        f"| `python -m distrib --help` vs `python -c pass` | {_cell(h)} | {_cell(p)} | "
        f"{h['median'] / p['median']:.2f} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    results = run(args.repeats, args.processes)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
