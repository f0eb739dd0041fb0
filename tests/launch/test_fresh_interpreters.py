"""Checks that need a fresh interpreter: what importing distrib loads, the console entry points, the worker
bootstrap run as a process, and the generated CLI reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_distrib_stays_lazy():
    code = "import sys, distrib; bad = [m for m in ('distrib._prepare', 'distrib.big_modeling', 'deepspeed', 'tensorboard') if m in sys.modules]; print(bad)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_every_strategy_imports_no_optional_backend():
    code = (
        "import sys, importlib\n"
        "from distrib import strategies\n"
        "for path in strategies.REGISTRY.values(): importlib.import_module(path)\n"
        "print(sorted(m for m in ('deepspeed', 'torch_xla') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_python_dash_m_distrib_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "distrib", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and "distrib, version" in out.stdout, out.stdout + out.stderr


def test_cli_modules_do_not_import_torch():
    code = (
        "import sys, json; import distrib._cli.main, distrib._launch.executor, distrib._launch.worker; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_reference_docs_are_up_to_date():
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_cli_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_worker_bootstrap_runs_the_script_as_main_and_exits_like_python(tmp_path: Path):
    (tmp_path / "helper.py").write_text("VALUE = 'imported from the script dir'\n")
    (tmp_path / "job.py").write_text(
        "import atexit, sys\n"
        "import torch.distributed  # the bootstrap then skips C++ teardown; Python's must still happen\n"
        "import helper\n"
        "log = open(sys.argv[1], 'w')\n"
        "log.write(f'{__name__} {helper.VALUE} {sys.argv[2:]}')  # never closed: must be flushed anyway\n"
        "atexit.register(print, 'atexit ran', flush=True)\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distrib._launch.worker",
            str(tmp_path / "job.py"),
            str(tmp_path / "log.txt"),
            "-x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "atexit ran" in out.stdout
    assert (tmp_path / "log.txt").read_text() == "__main__ imported from the script dir ['-x']"


def test_worker_bootstrap_keeps_the_exit_code_and_traceback_of_a_failure(tmp_path: Path):
    (tmp_path / "bad.py").write_text(
        "import sys\nif len(sys.argv) > 1:\n    sys.exit(3)\nraise KeyError('nope')\n"
    )
    worker = [sys.executable, "-m", "distrib._launch.worker", str(tmp_path / "bad.py")]
    raised = subprocess.run(worker, capture_output=True, text=True, timeout=60, check=False)
    assert raised.returncode == 1 and "KeyError: 'nope'" in raised.stderr
    exited = subprocess.run([*worker, "exit"], capture_output=True, text=True, timeout=60, check=False)
    assert exited.returncode == 3
