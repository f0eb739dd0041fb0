"""Real launches through `python -m distrib launch`: torch's elastic agent, gloo, CPU processes.

Each test starts real worker processes (about 2 s per rank here), so several checks share one launch.
Every subprocess has a timeout and its whole output is printed when an assertion fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distrib.testing import free_port
from tests._support.launching import TIMEOUT, command, distrib_env, run, script, shown

pytestmark = pytest.mark.slow


REPORT = """
    import os, sys
    import torch
    import distrib

    with distrib.distributed() as ctx:
        total = distrib.reduce(torch.tensor([float(ctx.rank)]), "sum").item()
        print(f"REPORT rank={ctx.rank} local={ctx.local_rank} world={ctx.world_size} node={ctx.node_rank} "
              f"nodes={ctx.num_nodes} strategy={ctx.strategy} mp={ctx.mixed_precision} sum={total:g} "
              f"omp={os.environ.get('OMP_NUM_THREADS')} extra={os.environ.get('EXTRA')} args={sys.argv[1:]}",
              flush=True)
"""


def reports(stdout: str) -> list[dict[str, str]]:
    # two processes share the pipe: a rank's text and its newline can arrive as two writes with the
    # other rank's line in between, so cut at each "REPORT " rather than at line ends
    chunks = re.findall(r"REPORT (.*?)(?=REPORT |\n|$)", stdout)
    out = [dict(part.split("=", 1) for part in chunk.strip().split(" ", 10)) for chunk in chunks]
    return sorted(out, key=lambda r: int(r["rank"]))


def test_two_processes_get_ranks_settings_and_script_args(tmp_path: Path):
    name = script(tmp_path, "report.py", REPORT)
    result = run(
        tmp_path,
        "launch",
        "--num-processes",
        "2",
        "--mixed-precision",
        "bf16",
        "--env",
        "EXTRA=yes",
        name,
        "--lr",
        "3",
    )
    assert result.returncode == 0, shown(result)
    found = reports(result.stdout)
    assert [r["rank"] for r in found] == ["0", "1"], shown(result)
    for r in found:
        assert (r["world"], r["strategy"], r["mp"], r["sum"], r["extra"]) == ("2", "ddp", "bf16", "1", "yes")
        assert r["omp"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
        assert r["args"] == "['--lr', '3']"


def test_four_processes_from_a_module_and_a_config_file(tmp_path: Path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    script(package, "report.py", REPORT)
    (tmp_path / "c.yaml").write_text("version: 1\nnum_processes: 4\nnum_cpu_threads_per_process: 1\n")
    result = run(tmp_path, "launch", "--config-file", "c.yaml", "-m", "pkg.report", "x")
    assert result.returncode == 0, shown(result)
    found = reports(result.stdout)
    assert [(r["rank"], r["local"], r["world"], r["omp"]) for r in found] == [
        (str(i), str(i), "4", "1") for i in range(4)
    ], shown(result)
    assert {r["sum"] for r in found} == {"6"}


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_two_machines_on_this_host(tmp_path: Path, backend: str):
    name = script(tmp_path, "report.py", REPORT)
    port = free_port()
    common = [
        "launch",
        "--num-machines",
        "2",
        "--num-processes",
        "2",
        "--main-process-ip",
        "127.0.0.1",
        "--main-process-port",
        str(port),
        "--rdzv-backend",
        backend,
        "--rdzv-timeout",
        "60",
    ]
    procs = [
        subprocess.Popen(
            command(*common, "--machine-rank", str(rank), name),
            cwd=tmp_path,
            env=distrib_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            outputs.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    text = "\n".join(shown(o) for o in outputs)
    assert all(o.returncode == 0 for o in outputs), text
    found = reports(outputs[0].stdout + outputs[1].stdout)
    assert [(r["rank"], r["node"], r["local"], r["nodes"], r["world"], r["sum"]) for r in found] == [
        ("0", "0", "0", "2", "2", "1"),
        ("1", "1", "0", "2", "2", "1"),
    ], text
    if backend == "static":  # node rank = --machine-rank; c10d numbers the machines in the order they join
        assert "node=1" in outputs[0].stdout, text


def test_a_failing_rank_stops_the_others_and_is_reported_with_its_traceback(tmp_path: Path):
    name = script(
        tmp_path,
        "fail.py",
        """
        import os, time
        if os.environ["RANK"] == "1":
            raise RuntimeError("boom on purpose")
        time.sleep(120)
        print("rank 0 was never stopped", flush=True)
    """,
    )
    result = run(tmp_path, "launch", "--num-processes", "2", name)
    assert result.returncode == 1, shown(result)
    report = result.stderr[result.stderr.index("distrib: rank 1") :]
    assert report.startswith("distrib: rank 1 (local rank 1) on machine 0"), shown(result)
    assert 'File "' in report and 'raise RuntimeError("boom on purpose")' in report, shown(result)
    assert "RuntimeError: boom on purpose" in report
    assert "rank 0 (local rank 0): stopped by the launcher" in report
    assert "never stopped" not in result.stdout


def test_max_restarts_restarts_a_group_that_failed_once(tmp_path: Path):
    name = script(
        tmp_path,
        "flaky.py",
        """
        import os
        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        print(f"ATTEMPT rank={os.environ['RANK']} attempt={attempt}", flush=True)
        if attempt == 0 and os.environ["RANK"] == "1":
            raise SystemExit("first attempt fails")
    """,
    )
    failed = run(tmp_path, "launch", "--num-processes", "2", "--quiet", name)
    assert failed.returncode == 1, shown(failed)
    assert "ATTEMPT rank=1 attempt=1" not in failed.stdout
    result = run(tmp_path, "launch", "--num-processes", "2", "--max-restarts", "1", name)
    assert result.returncode == 0, shown(result)
    assert "ATTEMPT rank=0 attempt=1" in result.stdout and "ATTEMPT rank=1 attempt=1" in result.stdout
    assert "restarting" in result.stderr, shown(result)


RESTART_RACE = """
    import os, time
    import torch
    import torch.distributed as dist
    import distrib

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    rank = int(os.environ["RANK"])
    if attempt == 1 and rank == 1:
        time.sleep(3)  # rank 0 rendezvouses first: it must not find the address rank 1 had in attempt 0
    scope = distrib.distributed() if os.environ.get("USE_SCOPE") else None
    if scope is not None:
        scope.__enter__()
    else:
        dist.init_process_group("gloo")
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"ATTEMPT rank={rank} attempt={attempt} sum={total.item():g}", flush=True)
    if attempt == 0:
        if rank == 1:
            raise SystemExit("first attempt fails")
        time.sleep(60)  # stopped by the launcher
    if scope is not None:
        scope.__exit__(None, None, None)
    else:
        dist.barrier()
        dist.destroy_process_group()
"""


def restarted_cleanly(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, shown(result)
    for rank in (0, 1):
        assert f"ATTEMPT rank={rank} attempt=1 sum=2" in result.stdout, shown(result)
    assert "Connection refused" not in result.stderr, shown(result)


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_a_restarted_group_gets_a_store_without_the_failed_attempts_keys(tmp_path: Path, backend: str):
    # Any script, here plain torch.distributed: torch's agent keeps one store for the whole job and env://
    # adds no per-attempt prefix, so without a new store per attempt rank 0 would connect to the gloo
    # address rank 1 left there in attempt 0 (refused, or a hang).
    name = script(tmp_path, "race.py", RESTART_RACE)
    result = run(
        tmp_path, "launch", "--num-processes", "2", "--max-restarts", "1", "--rdzv-backend", backend, name
    )
    restarted_cleanly(result)


def test_the_scope_restarts_cleanly_under_plain_torchrun(tmp_path: Path):
    # torchrun's own store keeps attempt 0's keys; the scope joins it under the attempt's prefix.
    name = script(tmp_path, "race.py", RESTART_RACE)
    env = {**distrib_env(tmp_path), "USE_SCOPE": "1"}
    args = ["--nproc-per-node", "2", "--max-restarts", "1", "--master-port", str(free_port()), name]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    restarted_cleanly(result)


def test_distrib_test_passes_on_cpu_with_two_processes(tmp_path: Path):
    result = run(tmp_path, "test", "--num-processes", "2", "--cpu", timeout=180)
    assert result.returncode == 0, shown(result)
    assert "[FAIL]" not in result.stdout
    for check in (
        "process group",
        "ranks and devices",
        "collectives",
        "dataloader shards",
        "training matches one process",
        "mixed precision",
    ):
        assert f"[PASS] {check}" in result.stdout, shown(result)
    assert "distrib test: PASSED" in result.stderr
