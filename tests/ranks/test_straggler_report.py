"""The straggler report on real processes: a rank slowed in its data loading or in its forward pass is
flagged with that phase, through the logger and the trackers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from distrib.testing import run_ranks


class SlowDataset(torch.utils.data.Dataset):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        return torch.full((4,), float(i)), torch.tensor(float(i % 2))


class SlowModel(torch.nn.Module):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x):
        time.sleep(self.delay)
        return self.linear(x).squeeze(-1)


def _straggler_worker(slow_phase: str, directory: str) -> dict:
    from distrib import backward, distributed, end_training, init_trackers, prepare

    with distributed(straggler_report_every=3, project_dir=directory) as ctx:
        init_trackers("straggler", trackers="jsonl")
        slow = ctx.rank == 1
        dataset = SlowDataset(0.01 if slow and slow_phase == "data" else 0.0)
        model = SlowModel(0.04 if slow and slow_phase == "compute" else 0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model, optimizer, loader = prepare(
            model, optimizer, torch.utils.data.DataLoader(dataset, batch_size=4)
        )
        for x, y in loader:
            backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        report = ctx.state.extensions["straggler"].last_report
        end_training()
    return report


@pytest.mark.parametrize("slow_phase", ["data", "compute"])
def test_the_slow_rank_is_flagged_with_its_slow_phase(tmp_path, capfd, slow_phase):
    reports = run_ranks(_straggler_worker, 2, slow_phase, str(tmp_path), timeout=240)
    assert reports[0] == reports[1], "every rank computes the same report"
    report = reports[0]
    assert report["step"] == 6, "reported at the first backward after every 3rd optimizer step"
    assert [(f["rank"], f["phase"]) for f in report["flagged"]] == [(1, slow_phase)]
    waiting, slow = report["ranks"]
    assert waiting["comm"] > slow["comm"], "the fast rank waits for the slow one"
    err = capfd.readouterr().err
    label = "data wait" if slow_phase == "data" else "compute"
    assert "straggler report at optimizer step" in err and f"slower than the median, in {label}" in err
    records = [
        json.loads(line) for line in (Path(tmp_path) / "straggler" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r for r in records if "straggler/flagged_ranks" in r]
    assert [r["step"] for r in logged] == [3, 6]
    assert logged[-1]["straggler/slowest_rank"] == 1
    assert {f"straggler/rank_{r}/{p}_ms" for r in (0, 1) for p in ("data", "compute", "comm")} <= set(
        logged[-1]
    )


def _plain_backward_worker() -> list[str]:
    import warnings

    from distrib import distributed, prepare

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with distributed(straggler_report_every=2):
            model = torch.nn.Linear(4, 1)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            model, optimizer = prepare(model, optimizer)
            for _ in range(3):
                model(torch.ones(2, 4)).sum().backward()  # not distrib.backward: nothing is timed
                optimizer.step()
                optimizer.zero_grad()
    return [str(w.message) for w in caught]


def test_a_report_that_is_never_made_is_not_silent():
    for messages in run_ranks(_plain_backward_worker, 2, timeout=240):
        assert any("no straggler report was made" in m and "backward(loss)" in m for m in messages), messages
