"""Checkpointing: save every N optimizer steps, keep the newest few, resume where the last run stopped.

Run it twice: the first run trains and saves to runs/checkpointing-example/checkpoints/step_*, the second
finds the newest checkpoint and continues from it (mid-epoch included) instead of starting over.

    python examples/checkpointing.py --stop-after 25   # stops early, as if interrupted
    python examples/checkpointing.py                   # resumes at step 25 and finishes
    python examples/checkpointing.py --background      # saves in the background while training goes on
    distrib launch --num-processes 2 examples/checkpointing.py

A run saved by 2 processes also resumes on 1 or 4 (`--num-processes 4`): the rest of the same epoch is
dealt among the new ranks and each rank's batch changes so that a step still takes 64 samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import classification_data, small_model
from torch.utils.data import DataLoader

import distrib
from distrib import (
    accumulate,
    backward,
    distributed,
    is_main_process,
    load_state,
    prepare,
    register_for_checkpointing,
    register_save_state_pre_hook,
    save_model,
    save_state,
)


class RunningLoss:
    """Anything with state_dict/load_state_dict can ride along in the checkpoints."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, loss: torch.Tensor) -> None:
        self.total, self.count = self.total + float(loss), self.count + 1

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = state["total"], int(state["count"])


def main(args: argparse.Namespace) -> None:
    # distrib: checkpoints go to <project_dir>/checkpoints/step_<optimizer step>, the newest 3 are kept
    with distributed(
        project_dir=args.project_dir,
        total_limit=3,
        gradient_accumulation_steps=2,
        seed=0,
        background_saves=args.background,  # distrib: save_state() snapshots and writes in a thread
    ) as ctx:
        model = small_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = DataLoader(classification_data(2048), batch_size=16, shuffle=True)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
        model, optimizer, loader, scheduler = prepare(model, optimizer, loader, scheduler)
        running = RunningLoss()
        register_for_checkpointing(running)  # distrib: saved and restored with everything else

        def save_config(models: list[torch.nn.Module], directory: Path) -> None:
            if is_main_process():  # distrib: extra files become part of the checkpoint
                (directory / "config.json").write_text(json.dumps(vars(args)))

        register_save_state_pre_hook(save_config)

        resumed = load_state("latest")  # distrib: None on the first run
        if resumed is not None:
            distrib.print(f"resumed from {resumed} at step {ctx.state.optimizer_steps}")

        for _ in range(loader.epoch, args.epochs):  # a resumed run continues its epoch, mid-way
            for x, y in loader:
                with accumulate(model):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                running.update(loss.detach())
                step = ctx.state.optimizer_steps
                if ctx.sync_gradients and step % args.save_every == 0:
                    save_state()  # distrib: atomic; every rank calls it (the scope's exit waits for it)
                if step == args.stop_after:
                    distrib.print(f"stopping at step {step}; run again to resume")
                    return
        save_model(model, Path(args.project_dir) / "model")  # distrib: plain safetensors weights
        distrib.print(
            f"done: {ctx.state.optimizer_steps} steps, mean loss {running.total / running.count:.4f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--project-dir", default="runs/checkpointing-example")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=25, help="optimizer steps between checkpoints")
    parser.add_argument("--stop-after", type=int, default=-1, help="stop at this step (simulates a kill)")
    parser.add_argument("--background", action="store_true", help="save in the background")
    main(parser.parse_args())
