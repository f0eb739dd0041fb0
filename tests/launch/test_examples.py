"""Every example in examples/ runs to completion on 2 CPU processes under `distrib launch`.

Each example is started as a user would start it (`python -m distrib launch --num-processes 2 --cpu
examples/NAME.py ARGS`), in a temporary working directory so that what it writes (runs/, checkpoints)
goes away, with the short arguments below. A failure prints everything the launch printed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))

# short runs: the example's own flags for a quick pass
ARGS: dict[str, list[str]] = {
    "train.py": ["--epochs", "1"],
    "auto_resume.py": ["--epochs", "1"],
    "checkpointing.py": ["--epochs", "1"],
    "big_model_inference.py": ["--size-mb", "8"],
    "image_classifier.py": ["--epochs", "1"],
    "nlp_finetune.py": ["--epochs", "1"],
    "hf_datasets.py": ["--epochs", "1"],
    "peft_lora.py": ["--epochs", "1"],
}
# examples that need an optional package: skipped with the reason when it is missing
REQUIRES: dict[str, str] = {
    "nlp_finetune.py": "transformers",
    "hf_datasets.py": "datasets",
    "peft_lora.py": "peft",
}
TIMEOUT = 300  # seconds per example: a loaded 2-core machine starts two ranks in ~10-20 s


def launch(script: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIB_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "distrib", "launch", "--num-processes", "2", "--cpu", str(script)]
    cmd += ARGS.get(script.name, [])
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_on_two_processes(script: Path, tmp_path: Path) -> None:
    needed = REQUIRES.get(script.name)
    if needed and importlib.util.find_spec(needed) is None:
        pytest.skip(f"{script.name} needs {needed}, which is not installed (pip install {needed})")
    try:
        proc = launch(script, tmp_path)
    except subprocess.TimeoutExpired as exc:
        so_far = [
            o.decode(errors="replace") if isinstance(o, bytes) else (o or "")
            for o in (exc.stdout, exc.stderr)
        ]
        pytest.fail(f"{script.name} did not finish in {TIMEOUT} s; output so far:\n" + "\n".join(so_far))
    output = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, f"{script.name} failed with exit code {proc.returncode}\n{output}"
    assert (proc.stdout + proc.stderr).strip(), f"{script.name} printed nothing"


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy", [["--strategy", "fsdp"], ["--strategy", "deepspeed", "--zero-stage", "3"]]
)
def test_lora_fine_tuning_trains_only_the_adapters_under_sharded_strategies(strategy, tmp_path: Path) -> None:
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft_lora.py needs peft, which is not installed (pip install peft)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIB_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "distrib", "launch", "--num-processes", "2", "--cpu", *strategy,
           str(ROOT / "examples" / "peft_lora.py"), "--epochs", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"strategy {strategy[1]}: training" in proc.stdout
    assert "lora weights changed: True; base weights unchanged: True" in proc.stdout, proc.stdout


def test_every_example_is_listed_in_the_guide() -> None:
    guide = (ROOT / "docs" / "how-to" / "examples.md").read_text()
    missing = [p.name for p in EXAMPLES if p.name not in guide]
    assert not missing, f"docs/how-to/examples.md does not mention: {missing}"


def test_the_example_runs_with_layers_on_disk_and_agrees_with_the_plain_model():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, str(root / "examples" / "big_model_inference.py"), "--size-mb", "64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'disk'" in result.stdout and "'cpu'" in result.stdout
    assert "predictions agree: True; logits bit-identical: True" in result.stdout
