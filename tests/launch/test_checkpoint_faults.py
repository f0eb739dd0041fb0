"""A save killed with SIGKILL at every instrumented point of `save_state` never costs a checkpoint.

For each point of `distrib.checkpointing._faults.POINTS` a fresh process saves with the point armed (as
`DISTRIB_CHECKPOINT_FAULT=<point>` does) and kills itself there (the test checks it really died by SIGKILL).
Then another process checks that the newest checkpoint (the project's "latest", or the explicit path) is
complete, verifies, loads and holds one save's values (the previous save's, or the killed one's when the
kill came after it was in place), and saves once more: the leftovers are cleaned up and, with
`total_limit`, never the only complete copy. Every parameter of the saved model holds the save's number,
so files of two saves can never mix unnoticed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distrib.checkpointing._faults import POINTS

pytestmark = pytest.mark.slow

#: how each point is reached: (mode, total_limit)
SCENARIOS: dict[str, tuple[str, int | None]] = {
    "after_plan": ("project", 2),
    "during_write": ("project", 2),
    "after_write": ("project", 2),
    "after_manifest": ("project", 2),
    "after_exchange": ("explicit", None),
    "after_move_aside": ("explicit-without-exchange", None),
    "after_publish": ("project", 2),
    "during_rotate": ("project", 1),
    "background_write": ("background", 2),
}


def test_every_fault_point_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(POINTS)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every scenario, run by one helper process that forks a child per save (torch imported once)."""
    workdir = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DISTRIB_CHECKPOINT_FAULT", None)
    done = subprocess.run(
        [sys.executable, __file__, str(workdir)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_each_point_leaves_a_loadable_checkpoint(report: dict[str, Any], point: str) -> None:
    outcome = report[point]
    assert outcome["first"]["status"] == 0, outcome["first"]
    assert outcome["killed"]["status"] == -signal.SIGKILL, f"the save was not killed at {point!r}: {outcome}"
    after = outcome["after"]
    assert after["status"] == 0, after
    result = after["result"]
    assert result["loaded_value"] in (1, 2), result  # the previous save, or the killed one once in place
    if point in ("after_plan", "during_write", "after_write", "after_manifest", "background_write"):
        assert result["loaded_value"] == 1, f"{point}: an unfinished save became the checkpoint: {result}"
    if point in ("after_publish", "during_rotate", "after_exchange", "after_move_aside"):
        assert result["loaded_value"] == 2, f"{point}: a finished save was lost: {result}"
    assert result["leftovers_after_next_save"] == [], result
    assert result["complete_after_next_save"] >= 1, result


# --- the helper process -----------------------------------------------------------------------------


def _forked(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run `fn(*args)` in a forked child; its exit status (negative: killed by that signal) and result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns
        os.close(read)
        try:
            out = {"result": fn(*args)}
        except BaseException:
            out = {"error": traceback.format_exc()}
        os.write(write, json.dumps(out).encode())
        os._exit(0 if "result" in out else 1)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks)) if chunks else {}
    return {"status": os.waitstatus_to_exitcode(status), **out}


def _model() -> Any:
    import torch

    from distrib import prepare

    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))  # ~2 MB
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return prepare(model, optimizer)


def _fill(model: Any, value: float) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _values(model: Any) -> set[float]:
    import torch

    return {float(v) for p in model.parameters() for v in torch.unique(p.detach())}


def _save(ctx: Any, model: Any, target: Path | None, background: bool, value: int) -> None:
    from distrib import save_state

    _fill(model, float(value))
    ctx.state.optimizer_steps = value
    result = save_state(target, background=background)
    if background:
        result.wait()


def _run(workdir: str, mode: str, total_limit: int | None, value: int, fault: str | None) -> dict[str, Any]:
    import torch

    from distrib import distributed, load_state
    from distrib.checkpointing import _faults, _layout

    _faults._read, _faults._armed = True, (fault, None) if fault else None  # as the variable would
    root = Path(workdir)
    _layout.USE_EXCHANGE = mode != "explicit-without-exchange"
    explicit = root / "explicit" if mode.startswith("explicit") else None
    with distributed(project_dir=str(root), total_limit=total_limit) as ctx:
        model, optimizer = _model()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # momentum buffers: the optimizer state is as large as the model
        loaded = None if value == 1 else load_state(explicit if explicit is not None else "latest")
        report: dict[str, Any] = {"loaded": str(loaded) if loaded else None}
        if loaded is not None:
            values = _values(model)
            assert len(values) == 1 and ctx.state.optimizer_steps == int(values.pop()), "mixed saves"
            report["loaded_value"] = ctx.state.optimizer_steps
        background = mode == "background"
        if value == 1:  # two saves, so that rotation has something to rotate
            _save(ctx, model, explicit, background, 1)
        _save(ctx, model, explicit, background, value)
        parent = explicit.parent if explicit is not None else root / "checkpoints"
        report["leftovers_after_next_save"] = sorted(
            p.name for p in parent.iterdir() if p.name.startswith(".")
        )
        report["complete_after_next_save"] = sum((p / "manifest.json").is_file() for p in parent.iterdir())
    return report


def main(workdir: str) -> None:
    import torch

    torch.set_num_threads(1)  # no thread pools to inherit across fork
    out = {}
    for point in POINTS:
        mode, limit = SCENARIOS[point]
        directory = str(Path(workdir) / point)
        out[point] = {
            "first": _forked(_run, directory, mode, limit, 1, None),
            "killed": _forked(_run, directory, mode, limit, 2, point),
            "after": _forked(_run, directory, mode, limit, 3, None),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
