"""A run resumed from a checkpoint never records a step twice: the JSON-lines tracker drops what the run
that died logged after its checkpoint, whether `init_trackers` comes before `load_state` or after; hosted
trackers continue the run they started (its id is kept in the logging directory)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from distrib import backward, distributed, init_trackers, load_state, log, prepare, save_state


def _train(project: Path, steps: range, *, save_at: int | None, order: str) -> None:
    with distributed(cpu=True, project_dir=str(project)) as ctx:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        model, optimizer = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        if order == "trackers first":
            init_trackers("exp")
            load_state("latest")
        else:
            load_state("latest")
            init_trackers("exp")
        for _ in steps:
            if ctx.optimizer_steps >= steps.stop:
                break
            backward(model(torch.ones(1, 2)).sum())
            optimizer.step()
            optimizer.zero_grad()
            log({"loss": float(ctx.optimizer_steps)}, step=ctx.optimizer_steps * 10)  # the user's own unit
            if ctx.optimizer_steps == save_at:
                save_state()


@pytest.mark.parametrize("order", ["trackers first", "checkpoint first"])
def test_a_resumed_run_logs_each_step_once(tmp_path: Path, order: str):
    _train(tmp_path, range(8), save_at=4, order=order)  # dies after step 8, last checkpoint at step 4
    _train(tmp_path, range(12), save_at=None, order=order)  # resumes at step 4, goes on to 12
    records = [json.loads(line) for line in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10 * s for s in range(1, 13)]
    assert [r["optimizer_step"] for r in records] == list(range(1, 13))


def test_hosted_trackers_continue_their_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    inits: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> Any:
        inits.append(kwargs)
        return types.SimpleNamespace(
            id=kwargs.get("id", "run-1"), log=lambda *a, **k: None, finish=lambda: None
        )

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for _ in range(2):
        with distributed(cpu=True, project_dir=str(tmp_path)):
            prepare(torch.nn.Linear(2, 1))
            load_state("latest")
            init_trackers("exp", trackers="wandb")
            save_state()
    assert "id" not in inits[0] and (tmp_path / "exp" / "wandb_run_id").read_text().strip() == "run-1"
    assert inits[1]["id"] == "run-1" and inits[1]["resume"] == "allow"
