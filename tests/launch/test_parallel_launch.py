"""N-D parallelism through `distrib launch`: the size flags and a JSON plan reach every worker, and sizes
that do not fit the number of processes stop every worker with the sizes and the world size named."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import torch
from distrib import distributed, prepare
from tests._support.parallel import make_model

with distributed() as ctx:
    model = prepare(make_model())
    split = sum(1 for p in model.parameters() if type(p).__name__ == "DTensor")
    print(f"REPORT rank={ctx.rank} tp_rank={ctx.tp_rank} dp_size={ctx.dp_world_size} split={split} "
          f"dims={ctx.mesh.mesh_dim_names}", flush=True)
"""


def _launch(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIB_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "distrib", "launch", "--num-processes", "2", "--cpu", *flags, str(script)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_size_flags_and_a_json_plan_reach_every_worker(tmp_path: Path):
    proc = _launch(
        tmp_path, "--tp-size", "2", "--tp-plan", '{"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}'
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # two workers may print on one line of the launcher's output: take every report wherever it is
    reports = sorted(m.strip() for m in re.findall(r"REPORT rank=.*?dims=\([^)]*\)", output))
    dims = "('pp', 'dp_replicate', 'dp_shard', 'cp', 'tp')"
    assert reports == [f"REPORT rank={r} tp_rank={r} dp_size=1 split=16 dims={dims}" for r in (0, 1)]


def test_sizes_that_do_not_fit_stop_every_worker_with_the_reason(tmp_path: Path):
    proc = _launch(tmp_path, "--tp-size", "3")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "multiply to 3, which does not divide 2" in output, output
