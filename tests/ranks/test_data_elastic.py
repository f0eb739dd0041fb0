"""Resume on another number of processes (issue 13): train on 2 ranks, save mid-epoch and at an epoch's
end, resume on 1, 3 (oversubscribed) and 4 (and 1 -> 3, 1 -> 4); every epoch covers the dataset exactly
once and the final parameters equal a 1-process run with the same global batch. The same for FSDP2
2 -> 4 and 4 -> 2."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distrib import accumulate, backward, distributed, gather, prepare, sample_generator
from distrib.checkpointing import load_state, save_state
from distrib.testing import run_ranks
from tests._support.models import WIDTH, full_state, make_model, max_difference

NUM_SAMPLES, EPOCHS = 48, 2
TOLERANCE = 1e-5


class Noisy(Dataset):  # type: ignore[type-arg]
    """Sample i is (i, x_i + noise, y_i); the noise is keyed by the sample (sample_generator), so it is the
    same on any number of processes."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(NUM_SAMPLES, WIDTH, generator=g)
        self.y = torch.randint(0, 3, (NUM_SAMPLES,), generator=g)

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        noise = 0.05 * torch.randn(WIDTH, generator=sample_generator(i))
        return i, self.x[i] + noise, self.y[i]


def train(
    workdir: str,
    *,
    batch_size: int,
    accumulation: int = 1,
    strategy: str = "auto",
    save_at: tuple[int, ...] = (),
    resume: str | None = None,
) -> dict[str, Any]:
    """Train EPOCHS; save at the optimizer steps in `save_at` (inside the loop); or resume from `resume`."""
    with distributed(strategy=strategy, seed=0, gradient_accumulation_steps=accumulation) as ctx:
        model = make_model(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
        loader = DataLoader(Noisy(), batch_size=batch_size, shuffle=True)
        model, optimizer, loader = prepare(model, optimizer, loader)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if resume is not None:
                load_state(f"{workdir}/{resume}")
        log: dict[int, list[int]] = {}
        for epoch in range(loader.epoch, EPOCHS):
            for idx, x, y in loader:
                with accumulate(model):
                    backward(nn.functional.cross_entropy(model(x), y))
                    optimizer.step()
                    optimizer.zero_grad()
                log.setdefault(epoch, []).extend(gather(idx).tolist())
                if ctx.sync_gradients and ctx.state.optimizer_steps in save_at:
                    save_state(f"{workdir}/step{ctx.state.optimizer_steps}")
        return {
            "log": log,
            "params": full_state(ctx, model),
            "warnings": [str(w.message) for w in caught],
            "accumulation": ctx.gradient_accumulation_steps,
            "steps": ctx.state.optimizer_steps,
        }


def _save_on_two(root: str) -> dict[str, Any]:
    # one outer scope owns the process group; each run opens its own scope inside it (a new group per run
    # would cost a rendezvous each time)
    with distributed():
        return _save_on_two_runs(root)


def _save_on_two_runs(root: str) -> dict[str, Any]:
    return {
        # 12 samples per optimizer step, 4 steps per epoch: save mid-epoch 0, at its last batch, in epoch 1
        "A": train(f"{root}/A", batch_size=6, save_at=(2, 4, 5)),
        "B": train(f"{root}/B", batch_size=3, accumulation=2, save_at=(5,)),  # 3 x 2 ranks x 2 windows
        "C": train(f"{root}/C", batch_size=4, save_at=(2,)),  # 8 per step: no per-rank batch on 3
    }


def _resume_on_one(root: str) -> dict[str, Any]:
    with distributed():
        return _resume_on_one_runs(root)


def _resume_on_one_runs(root: str) -> dict[str, Any]:
    out = {f"A{step}": train(f"{root}/A", batch_size=6, resume=f"step{step}") for step in (2, 4, 5)}
    # one process, the same global batch: the reference, and a checkpoint to resume on 3 and 4
    out["reference"] = train(f"{root}/R", batch_size=12, save_at=(5,))
    return out


def _resume_on_three(root: str) -> dict[str, Any]:
    with distributed():
        out: dict[str, Any] = {
            "A5": train(f"{root}/A", batch_size=6, resume="step5"),
            "R5": train(f"{root}/R", batch_size=12, resume="step5"),  # 1 -> 3
        }
        try:
            train(f"{root}/C", batch_size=4, resume="step2")
            out["C2"] = "no error"
        except Exception as e:  # reported to the test
            out["C2"] = f"{type(e).__name__}: {e}"
        return out


def _resume_on_four(root: str) -> dict[str, Any]:
    with distributed():
        return {
            "A4": train(f"{root}/A", batch_size=6, resume="step4"),
            "B5": train(f"{root}/B", batch_size=3, accumulation=2, resume="step5"),
            "R5": train(f"{root}/R", batch_size=12, resume="step5"),  # 1 -> 4
        }


def _consumed_before(step: int) -> tuple[int, int]:
    """(epoch, samples of it consumed) when the checkpoint of optimizer step `step` was saved."""
    epoch, done = divmod(step, NUM_SAMPLES // 12)
    return (epoch - 1, NUM_SAMPLES) if done == 0 else (epoch, done * 12)


def _check_resumed(name: str, resumed: dict[str, Any], reference: dict[str, Any], step: int) -> None:
    epoch, consumed = _consumed_before(step)
    assert resumed["log"].get(epoch, []) == reference["log"][epoch][consumed:], (
        f"{name}: the rest of epoch {epoch}"
    )
    for later in range(epoch + 1, EPOCHS):
        assert resumed["log"][later] == reference["log"][later], f"{name}: epoch {later}"
    assert resumed["steps"] == reference["steps"], name
    assert max_difference(resumed["params"], reference["params"]) < TOLERANCE, name


def test_ddp_resumes_on_one_three_and_four_processes(tmp_path: Path) -> None:
    root = str(tmp_path)
    saved = run_ranks(_save_on_two, 2, root, timeout=400)[0]
    on_one = run_ranks(_resume_on_one, 1, root, timeout=400)[0]
    on_three = run_ranks(_resume_on_three, 3, root, timeout=400)[0]
    on_four = run_ranks(_resume_on_four, 4, root, timeout=400)[0]
    reference = on_one["reference"]
    for epoch in range(EPOCHS):
        assert sorted(reference["log"][epoch]) == list(range(NUM_SAMPLES)), (
            "each epoch sees every sample once"
        )
        assert saved["A"]["log"][epoch] == reference["log"][epoch], "2 ranks draw the 1-process order"
    assert reference["log"][0] != reference["log"][1]
    for config in ("A", "B"):
        assert max_difference(saved[config]["params"], reference["params"]) < TOLERANCE, config
    for step in (2, 4, 5):
        _check_resumed(f"2 -> 1 from step {step}", on_one[f"A{step}"], reference, step)
        assert any("each rank's batch is now 12" in w for w in on_one[f"A{step}"]["warnings"])
    _check_resumed("2 -> 3", on_three["A5"], reference, 5)
    assert any("each rank's batch is now 4" in w for w in on_three["A5"]["warnings"])
    _check_resumed("1 -> 3", on_three["R5"], reference, 5)
    _check_resumed("1 -> 4", on_four["R5"], reference, 5)
    _check_resumed("2 -> 4", on_four["A4"], reference, 4)
    assert any("each rank's batch is now 3" in w for w in on_four["A4"]["warnings"])
    _check_resumed("2 -> 4, accumulation", on_four["B5"], reference, 5)
    assert on_four["B5"]["accumulation"] == 1, "3 per rank x 4 ranks x 1 step keeps 12 samples per step"
    assert any("gradient_accumulation_steps is now 1" in w for w in on_four["B5"]["warnings"])
    message = on_three["C2"]
    assert message.startswith("CheckpointMismatchError") and "(1, 2, 4, 8)" in message, message


def _fsdp_on_two(root: str, resume: bool) -> dict[str, Any]:
    with distributed():
        if resume:  # 4 -> 2, the script unchanged: 3 per rank, so each rank now takes 6
            return train(f"{root}/four", batch_size=3, strategy="fsdp", resume="step5")
        return train(f"{root}/two", batch_size=6, strategy="fsdp", save_at=(5,))


def _fsdp_on_four(root: str) -> dict[str, Any]:
    with distributed():
        return {
            "resumed": train(f"{root}/two", batch_size=6, strategy="fsdp", resume="step5"),  # 2 -> 4
            "uninterrupted": train(f"{root}/four", batch_size=3, strategy="fsdp", save_at=(5,)),
        }


def test_fsdp_resumes_from_two_on_four_and_from_four_on_two(tmp_path: Path) -> None:
    root = str(tmp_path)
    two = run_ranks(_fsdp_on_two, 2, root, False, timeout=400)[0]
    four = run_ranks(_fsdp_on_four, 4, root, timeout=400)[0]
    back = run_ranks(_fsdp_on_two, 2, root, True, timeout=400)[0]
    reference = two  # the uninterrupted 2-rank run; its 4-rank twin must agree too
    assert max_difference(four["uninterrupted"]["params"], reference["params"]) < TOLERANCE
    _check_resumed("fsdp 2 -> 4", four["resumed"], reference, 5)
    assert any("each rank's batch is now 3" in w for w in four["resumed"]["warnings"])
    _check_resumed("fsdp 4 -> 2", back, reference, 5)
    assert any("each rank's batch is now 6" in w for w in back["warnings"])
