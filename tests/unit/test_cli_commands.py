"""`distrib launch/test/env` in-process with CliRunner (no workers started), and the failure report."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from distrib._cli.main import cli
from distrib._launch import failures, machine
from distrib._launch.plan import MachineFacts
from distrib._settings import choices

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user config file, a fixed 4-core CPU-only machine, and no SLURM."""
    monkeypatch.setenv("DISTRIB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_NODES", raising=False)
    monkeypatch.setattr(
        machine, "detect", lambda need_gpus=True, strategy=None: MachineFacts(cpu_count=4, gpu_count=0)
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_dry_run_prints_the_plan_and_exits_0():
    code, out = invoke(
        "launch",
        "--num-processes",
        "2",
        "--mixed-precision",
        "bf16",
        "--env",
        "A=1=2",
        "--dry-run",
        "train.py",
        "--lr",
        "3",
    )
    assert code == 0, out
    assert "2 in total" in out and "DISTRIB_MIXED_PRECISION=bf16" in out and "A=1=2" in out
    assert "OMP_NUM_THREADS=2" in out and "train.py --lr 3" in out


def test_command_line_overrides_the_config_file(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("version: 1\nnum_processes: 4\nmixed_precision: bf16\nenv:\n  X: file\n")
    code, out = invoke(
        "launch", "--config-file", "c.yaml", "--num-processes", "2", "--env", "X=cli", "--dry-run", "train.py"
    )
    assert code == 0, out
    assert "2 in total" in out and "DISTRIB_MIXED_PRECISION=bf16" in out and "X=cli" in out
    assert "mixed_precision (file)" in out and "num_processes (command line)" in out


def test_default_config_file_is_read(tmp_path: Path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "default_config.yaml").write_text("version: 1\nnum_processes: 3\n")
    code, out = invoke("launch", "--dry-run", "train.py")
    assert code == 0 and "3 in total" in out


def test_arguments_after_the_script_belong_to_the_script():
    code, out = invoke("launch", "--dry-run", "train.py", "--num-processes", "7", "--bogus")
    assert code == 0, out
    assert "1 in total" in out and "train.py --num-processes 7 --bogus" in out


def test_module_targets(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(
        "raise SystemExit('the launcher must not import the package')\n"
    )
    (tmp_path / "pkg" / "train.py").write_text("")
    code, out = invoke("launch", "--dry-run", "-m", "pkg.train", "--epochs", "2")
    assert code == 0, out
    assert "module pkg.train --epochs 2" in out and "--module pkg.train --epochs 2" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus", "train.py"], "No such option '--bogus'"),
        (["missing.py"], "script 'missing.py' not found"),
        (["--num-processes", "0", "train.py"], "0 is not in the range x>=1"),
        (["--mixed-precision", "fp32", "train.py"], "'fp32' is not one of"),
        (
            ["--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "h", "train.py"],
            "machine_rank=2 is out of range for num_machines=2",
        ),
        (["--num-machines", "2", "train.py"], "needs main_process_ip"),
        (["--mixed-precision", "fp8", "train.py"], "needs a GPU"),
        (["--cpu", "--mixed-precision", "fp8", "train.py"], "needs a GPU"),
        (["--env", "NOEQUALS", "train.py"], "is not KEY=VALUE"),
        (["--config-file", "nope.yaml", "train.py"], "config file 'nope.yaml' does not exist"),
        (["--zero-stage", "5", "train.py"], "'5' is not one of '0', '1', '2', '3'"),
    ],
)
def test_usage_errors_exit_2_and_name_the_problem(args: list[str], message: str):
    code, out = invoke("launch", *args)
    assert code == 2, out
    assert message in out
    assert len(out.splitlines()) < 25  # one screen


def test_a_port_in_use_on_machine_0_is_a_usage_error():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = invoke("launch", "--main-process-port", str(port), "train.py")
    assert code == 2, out
    assert f"port {port} is already in use" in out and "--main-process-port" in out


def test_choices_come_from_the_settings_literals():
    code, out = invoke("launch", "--help")
    assert code == 0
    assert "[" + "|".join(choices("mixed_precision")) + "]" in out
    assert "[" + "|".join(choices("strategy")) + "]" in out


def test_launch_help_is_the_manual():
    code, out = invoke("launch", "--help")
    assert code == 0
    for flag in (
        "--num-processes",
        "--num-machines",
        "--machine-rank",
        "--main-process-ip",
        "--main-process-port",
        "--rdzv-backend",
        "--max-restarts",
        "--monitor-interval",
        "--strategy",
        "--mixed-precision",
        "--gradient-accumulation-steps",
        "--cpu",
        "--gpu-ids",
        "--num-cpu-threads-per-process",
        "--fsdp-sharding",
        "--fsdp-cpu-offload",
        "--fsdp-activation-checkpointing",
        "--deepspeed-config-file",
        "--zero-stage",
        "--offload-optimizer",
        "--offload-params",
        "--env",
        "--dry-run",
        "--quiet",
        "--config-file",
        "--seed",
        "--split-batches",
        "--module",
    ):
        assert flag in out, flag
    for words in (
        "OMP_NUM_THREADS",
        "DISTRIB_MIXED_PRECISION",
        "TORCHELASTIC_RESTART_COUNT",
        "traceback",
        "Rendezvous and restarts",
        "FSDP",
        "DeepSpeed",
    ):
        assert words in out, words


def test_test_command_dry_run_targets_the_sanity_script():
    code, out = invoke("test", "--num-processes", "2", "--dry-run")
    assert code == 0, out
    assert "sanity.py --expected-world-size 2 --expected-machines 1" in out


def test_env_command_lists_versions_and_the_config_file(tmp_path: Path):
    code, out = invoke("env")
    assert code == 0, out
    for words in (
        "distrib",
        "torch",
        "Python",
        "OS",
        "gloo available",
        "NCCL available",
        "deepspeed",
        "torch_xla",
        "config file",
        "does not exist",
    ):
        assert words in out, words


# -- failure reports --------------------------------------------------------------------------------

TRACE = (
    "Traceback (most recent call last):\n"
    '  File "<frozen runpy>", line 198, in _run_module_as_main\n'
    '  File "/x/distrib/_launch/worker.py", line 28, in main\n'
    "    run(args[0], args[1:], is_module=is_module)\n"
    '  File "/x/train.py", line 6, in <module>\n'
    '    raise RuntimeError("boom")\n'
    "RuntimeError: boom"
)


def failure(
    rank: int, exitcode: int, t: float, traceback: str = "", message: str = ""
) -> failures.WorkerFailure:
    return failures.WorkerFailure(
        rank=rank,
        local_rank=rank,
        exitcode=exitcode,
        pid=100 + rank,
        timestamp=t,
        traceback=traceback,
        message=message,
    )


def test_traceback_is_trimmed_to_the_users_frames():
    trimmed = failures.trim_traceback(TRACE)
    assert "worker.py" not in trimmed and "frozen runpy" not in trimmed
    assert trimmed.splitlines()[1:] == [
        '  File "/x/train.py", line 6, in <module>',
        '    raise RuntimeError("boom")',
        "RuntimeError: boom",
    ]


def test_the_worker_that_failed_first_is_reported_not_the_ones_stopped_after_it():
    crashed = failure(1, 1, 10.5, failures.trim_traceback(TRACE))
    stopped = failure(0, -15, 10.0)
    peer = failure(2, 1, 10.2, "RuntimeError: Connection closed by peer [127.0.0.1]:1")
    found = [stopped, peer, crashed]
    assert failures.first_failure(found) is crashed
    report = failures.format_report(found, failures.Evidence(machine_rank=3, hostname="node7", restarts=1))
    assert report.splitlines()[0] == (
        "distrib: rank 1 (local rank 1) on machine 3 (node7) failed first: exit code 1 (pid 101)."
    )
    assert "RuntimeError: boom" in report
    assert "rank 0 (local rank 0): stopped by the launcher (killed by SIGTERM)" in report
    assert "rank 2 (local rank 2): failed waiting for another rank (exit code 1)" in report
    assert "restarted 1 time(s)" in report
    assert failures.exit_code(crashed) == 1 and failures.exit_code(failure(0, -11, 1)) == 139


def test_a_crash_without_traceback_says_so():
    report = failures.format_report([failure(0, -11, 1.0, message="<NONE>")], failures.Evidence(hostname="h"))
    assert "killed by SIGSEGV" in report and "no Python traceback" in report


# -- worker bootstrap and sanity report -------------------------------------------------------------------


def test_sanity_report_names_the_rank_and_check_that_failed(capsys: pytest.CaptureFixture[str]):
    from types import SimpleNamespace

    from distrib._launch import sanity

    ctx = SimpleNamespace(
        world_size=2,
        num_nodes=1,
        strategy="ddp",
        device=SimpleNamespace(type="cpu"),
        mixed_precision="no",
        rank=0,
    )
    ok = sanity.report(
        ctx,
        [
            [("collectives", None), ("mixed precision", None)],
            [("collectives", "gather gave [0, 0]"), ("mixed precision", None)],
        ],
    )
    out = capsys.readouterr().out
    assert ok is False
    assert "[FAIL] collectives - rank 1: gather gave [0, 0]" in out and "[PASS] mixed precision" in out
    assert "Some checks FAILED." in out


def test_xla_plans_run_through_torch_xla_launch(monkeypatch: pytest.MonkeyPatch):
    import types

    from distrib._launch import executor
    from distrib._launch.plan import Target, build_plan
    from distrib.errors import MissingExtraError

    plan = build_plan(
        {"strategy": "xla", "num_processes": 1},
        target=Target("t.py", "script", ("-a",)),
        machine=MachineFacts(cpu_count=4, gpu_count=0),
    )
    calls = []

    def launch(fn, args=(), start_method="spawn", debug_single_process=False):
        calls.append((fn, args, debug_single_process, os.environ.get("DISTRIB_STRATEGY")))

    monkeypatch.setitem(sys.modules, "torch_xla", types.SimpleNamespace(launch=launch))
    executor.run_xla(plan)
    assert calls == [(executor._xla_worker, ("t.py", ("-a",), False), True, "xla")]
    assert "DISTRIB_STRATEGY" not in os.environ

    def failing(fn, args=(), start_method="spawn", debug_single_process=False):
        raise RuntimeError("process 0 terminated with exit code 1")

    monkeypatch.setitem(sys.modules, "torch_xla", types.SimpleNamespace(launch=failing))
    with pytest.raises(executor.WorkersFailed, match=r"an XLA worker on machine 0 .*\n.*exit code 1"):
        executor.run_xla(plan)
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'distrib\[xla\]'"):
        executor.run_xla(plan)
