"""A process killed with SIGKILL at random moments of `save_state` never costs a checkpoint.

A helper process (this file run as a script, one thread, torch already imported) forks a child per trial;
the child loops `save_state` on a model of a few MB (every parameter set to the step number) with
`total_limit=2`, and is killed after a random delay that spans the phases of a save (writing, hashing,
renaming, rotating). After each kill the newest complete checkpoint must verify and load, hold the values
of its own step, and be no older than the one found after the previous kill.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TRIALS = 25

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")]


def test_sigkill_during_save_state_never_loses_a_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(TRIALS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    trials = report["trials"]
    assert len(trials) == TRIALS
    previous = 0
    for trial in trials:
        assert trial["loaded"], f"trial {trial}: the newest complete checkpoint did not load"
        assert trial["values_match_step"], f"trial {trial}: files of different saves were mixed"
        assert trial["step"] >= previous, f"trial {trial}: an older checkpoint than before was picked"
        # total_limit=2, plus one when the kill fell between the rename and the rotation
        assert 1 <= trial["complete"] <= 3, f"trial {trial}: total_limit=2 broken"
        previous = trial["step"]
    # a temporary directory that was not there after the previous kill: this kill interrupted a save
    interrupted = sum(bool(set(t["leftovers"]) - set(p["leftovers"])) for p, t in itertools.pairwise(trials))
    assert interrupted >= 3, f"only {interrupted} kills landed inside a save; the test proves little"
    assert report["progress"] > 0, "no save ever completed between kills"
    assert report["leftovers_after_next_save"] == 0, "stale temporary directories were not removed"


# --- the helper process --------------------------------------------------------------------------------


def _model_and_optimizer() -> tuple[Any, Any]:
    import torch

    from distrib import prepare

    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))  # ~4 MB
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return prepare(model, optimizer)


def _fill(model: Any, value: float) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _saver(workdir: str, first_step: int, ready: int) -> None:
    """Child: save forever, every save with the parameters set to its step."""
    import torch

    from distrib import distributed
    from distrib.checkpointing import save_state

    with distributed(project_dir=workdir, total_limit=2) as ctx:
        model, optimizer = _model_and_optimizer()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # momentum buffers: the optimizer state is as large as the model
        os.write(ready, b"1")
        step = first_step
        while True:
            step += 1
            _fill(model, float(step))
            ctx.state.optimizer_steps = step
            save_state()


def _inspect(workdir: str) -> dict[str, Any]:
    """Load the newest complete checkpoint (verifying checksums) and check it is self-consistent."""
    import torch

    from distrib import distributed
    from distrib.checkpointing import latest_checkpoint, load_state

    root = Path(workdir) / "checkpoints"
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    complete = [p for p in root.iterdir() if (p / "manifest.json").is_file()]
    with distributed(project_dir=workdir) as ctx:
        model, _ = _model_and_optimizer()
        path = load_state("latest")
        step = ctx.state.optimizer_steps
        values = {float(v) for p in model.parameters() for v in torch.unique(p.detach())}
    return {
        "loaded": path is not None and path == latest_checkpoint(root),
        "step": step,
        "values_match_step": values == {float(step)},
        "leftovers": leftovers,
        "complete": len(complete),
    }


def _trial(workdir: str, first_step: int, delay: float) -> dict[str, Any]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns
        os.close(read)
        try:
            _saver(workdir, first_step, write)
        finally:
            os._exit(1)
    os.close(write)
    os.read(read, 1)  # set up and about to save
    os.close(read)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return {"delay": round(delay, 4), **_inspect(workdir)}


def _one_save(workdir: str, step: int) -> float:
    from distrib import distributed
    from distrib.checkpointing import save_state

    with distributed(project_dir=workdir, total_limit=2) as ctx:
        model, _ = _model_and_optimizer()
        _fill(model, float(step))
        ctx.state.optimizer_steps = step
        start = time.perf_counter()
        save_state()
        return time.perf_counter() - start


def main(workdir: str, trials: int) -> None:
    import torch

    torch.set_num_threads(1)  # no thread pools to inherit across fork
    delays = random.Random(0)  # its own generator: load_state restores the global ones
    duration = _one_save(workdir, 1)  # the first checkpoint; also times a save (and warms the imports)
    results = [_trial(workdir, 1 + 1000 * i, delays.uniform(0.0, 2.5 * duration)) for i in range(trials)]
    last = results[-1]["step"]
    _one_save(workdir, last + 1)
    root = Path(workdir) / "checkpoints"
    report = {
        "save_seconds": duration,
        "trials": results,
        "progress": sum(r["step"] > 1000 * i + 1 for i, r in enumerate(results)),  # saved in trial i
        "leftovers_after_next_save": sum(p.name.startswith(".") for p in root.iterdir()),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
